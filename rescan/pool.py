"""A process pool shaped as a ``concurrent.futures.Executor``, with per-task timeouts.

``WorkerPool`` runs tasks in worker processes that each call ``initializer(*initargs)`` once at
start (to load engines). Unlike ``ProcessPoolExecutor``, one crashing or hanging task does not
break the pool: a worker that dies fails only its own task with ``WorkerCrashed``, a task that
runs past ``task_timeout`` has its worker killed and fails with ``TaskTimeout``, and the worker
is replaced. A recycled worker is a healthy worker: ``max_tasks_per_worker`` bounds how long one
lives. Task functions must be picklable module-level functions.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # multiprocessing is imported when the first task starts the workers
    from multiprocessing.connection import Connection

from rescan.errors import InitializerFailed, RescanError, TaskTimeout, WorkerCrashed

__all__ = ["InitializerFailed", "TaskTimeout", "WorkerCrashed", "WorkerPool"]


def _worker_main(conn: Connection, initializer, initargs) -> None:
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:  # report and exit: the pool fails every task
        conn.send(("init-failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        task_id, fn, args, kwargs = msg
        try:
            result = fn(*args, **kwargs)
            conn.send((task_id, True, result))
        except BaseException as exc:
            try:
                conn.send((task_id, False, exc))
            except Exception:  # the exception itself cannot be pickled
                conn.send((task_id, False, RescanError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))


class _Worker:
    def __init__(self, ctx, initializer, initargs):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, initializer, initargs), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: tuple[int, Future, float, float] | None = None  # (id, future, deadline, timeout)
        self.done = 0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class WorkerPool(Executor):
    """An Executor over ``max_workers`` processes (default: the number of cores).

    ``task_timeout`` (seconds, None for no limit) bounds each task; ``max_tasks_per_worker``
    recycles workers. ``submit`` raises RuntimeError after ``shutdown``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        task_timeout: float | None = None,
        max_tasks_per_worker: int | None = 2000,
        mp_context: str | None = None,
        preload: tuple[str, ...] = (),
    ):
        self.max_workers = max_workers or os.cpu_count() or 1
        self._mp_context = mp_context
        self._preload = preload
        self._init = (initializer, initargs)
        self._timeout = task_timeout
        self._max_tasks = max_tasks_per_worker
        self._pending: deque[tuple[int, Future, Callable, tuple, dict, float | None]] = deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._shutdown = False
        self._broken: str | None = None
        self._workers: list[_Worker] = []
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        """Start the workers on the first submit: a run that scans nothing starts no process
        (and does not even import multiprocessing)."""
        import multiprocessing as mp

        # forkserver where there is one: a fresh, single-threaded parent for every worker
        # (the pipeline's own threads are never forked), and cheap to start with ``preload``.
        method = self._mp_context
        if method is None:
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(method)
        if method == "forkserver" and self._preload:
            self._ctx.set_forkserver_preload(list(self._preload))
        self._wakeup_r, self._wakeup_w = self._ctx.Pipe(duplex=False)
        self._workers = [self._spawn() for _ in range(self.max_workers)]
        self._thread = threading.Thread(target=self._loop, name="rescan-pool", daemon=True)
        self._thread.start()

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, *self._init)

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        """Schedule ``fn(*args, **kwargs)`` in a worker; returns its Future."""
        return self.submit_timed(self._timeout, fn, *args, **kwargs)

    def submit_timed(self, timeout: float | None, fn: Callable, /, *args, **kwargs) -> Future:
        """Like ``submit``, with this task's own time limit (None: no limit) instead of the
        pool's ``task_timeout``."""
        fut: Future = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            if self._broken:
                fut.set_exception(InitializerFailed(self._broken))
                return fut
            self._pending.append((next(self._ids), fut, fn, args, kwargs, timeout))
            if self._thread is None:
                self._start()
        self._wakeup_w.send_bytes(b"\0")
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers. Pending tasks run first unless ``cancel_futures``."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft()[1].cancel()
        if self._thread is None:
            return  # never started
        self._wakeup_w.send_bytes(b"\0")
        if wait:
            self._thread.join()

    # The dispatcher thread: assigns tasks, collects results, replaces dead or late workers.
    def _loop(self) -> None:
        from multiprocessing.connection import wait

        while True:
            self._assign()
            with self._lock:
                idle_exit = self._shutdown and not self._pending and all(w.task is None for w in self._workers)
            if idle_exit:
                break
            now = time.monotonic()
            deadlines = [w.task[2] for w in self._workers if w.task and w.task[2]]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            ready = wait(
                [self._wakeup_r] + [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers],
                timeout,
            )
            if self._wakeup_r in ready:
                while self._wakeup_r.poll():
                    self._wakeup_r.recv_bytes()
            for i, w in enumerate(list(self._workers)):
                self._service(i, w, ready)
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(5)
            w.kill()

    def _assign(self) -> None:
        with self._lock:  # at shutdown, cancelled tasks leave the queue without waiting for a worker
            if self._shutdown and self._pending:
                self._pending = deque(t for t in self._pending if not t[1].cancelled())
        for w in self._workers:
            while w.ready and w.task is None:
                with self._lock:
                    if not self._pending:
                        return
                    task_id, fut, fn, args, kwargs, timeout = self._pending.popleft()
                if not fut.set_running_or_notify_cancel():
                    continue  # cancelled meanwhile: this worker takes the next one
                deadline = time.monotonic() + timeout if timeout else 0.0
                w.task = (task_id, fut, deadline, timeout)
                try:
                    w.conn.send((task_id, fn, args, kwargs))
                except OSError:
                    pass  # the worker died; its sentinel will tell
                except Exception as exc:  # arguments that cannot be pickled
                    w.task = None
                    fut.set_exception(exc)

    def _replace(self, i: int, w: _Worker, exc: Exception | None) -> None:
        if w.task is not None and exc is not None:
            w.task[1].set_exception(exc)
        w.task = None
        w.kill()
        self._workers[i] = self._spawn()

    def _service(self, i: int, w: _Worker, ready: list) -> None:
        if w.conn in ready or w.proc.sentinel in ready:
            dead = w.proc.sentinel in ready
            msg = None
            try:
                if w.conn.poll():
                    msg = w.conn.recv()
            except (EOFError, OSError):
                dead = True
            if msg is not None:
                self._handle(i, w, msg)
                return
            if dead and not self._broken:
                w.proc.join(1)
                self._replace(i, w, WorkerCrashed(f"worker process died (exit code {w.proc.exitcode})"))
                return
        if w.task and w.task[2] and time.monotonic() >= w.task[2]:
            self._replace(i, w, TaskTimeout(f"task exceeded {w.task[3]:g} s"))

    def _handle(self, i: int, w: _Worker, msg: tuple) -> None:
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == "init-failed":
            self._fail_all(msg[1])
        else:
            _, ok, value = msg
            fut = w.task[1]
            w.task = None
            w.done += 1
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
            if self._max_tasks and w.done >= self._max_tasks:
                w.conn.send(None)
                self._replace(i, w, None)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._broken = reason
            self._shutdown = True
            pending = list(self._pending)
            self._pending.clear()
        for _, fut, *_ in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(InitializerFailed(reason))
        for w in self._workers:
            if w.task:
                w.task[1].set_exception(InitializerFailed(reason))
                w.task = None
