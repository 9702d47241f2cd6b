"""WorkerPool: results, crashes and hangs fail only their own task, initializer runs once."""

import os
import time

import pytest

from rescan.pool import InitializerFailed, TaskTimeout, WorkerCrashed, WorkerPool

_loaded = []


def _init(tag):
    _loaded.append(tag)


def _count_inits(_):
    return (os.getpid(), len(_loaded))


def _square(x):
    return x * x


def _crash(_):
    os._exit(3)


def _hang(_):
    time.sleep(60)


def _raise(_):
    raise ValueError("bad input")


def _fail_init():
    raise RuntimeError("cannot load rules")


def test_results_in_order_of_submission():
    with WorkerPool(2) as pool:
        futs = [pool.submit(_square, i) for i in range(20)]
        assert [f.result() for f in futs] == [i * i for i in range(20)]


def test_initializer_runs_once_per_worker():
    with WorkerPool(2, initializer=_init, initargs=("rules",)) as pool:
        results = [pool.submit(_count_inits, i).result() for i in range(10)]
    assert {n for _, n in results} == {1}
    assert len({pid for pid, _ in results}) <= 2


def test_crash_fails_only_its_task_and_worker_is_replaced():
    with WorkerPool(2) as pool:
        before = [pool.submit(_square, i) for i in range(4)]
        crash = pool.submit(_crash, 0)
        after = [pool.submit(_square, i) for i in range(4, 8)]
        with pytest.raises(WorkerCrashed):
            crash.result()
        assert [f.result() for f in before + after] == [i * i for i in range(8)]


def test_hang_times_out_and_pool_goes_on():
    with WorkerPool(1, task_timeout=1) as pool:
        hung = pool.submit(_hang, 0)
        nxt = pool.submit(_square, 3)
        with pytest.raises(TaskTimeout):
            hung.result()
        assert nxt.result() == 9


def test_task_exception_is_the_tasks_own():
    with WorkerPool(1) as pool:
        with pytest.raises(ValueError, match="bad input"):
            pool.submit(_raise, 0).result()
        assert pool.submit(_square, 2).result() == 4


def test_failing_initializer_fails_every_task():
    with WorkerPool(2, initializer=_fail_init) as pool:
        futs = [pool.submit(_square, i) for i in range(3)]
        for f in futs:
            with pytest.raises(InitializerFailed, match="cannot load rules"):
                f.result(timeout=60)


def test_workers_are_recycled():
    with WorkerPool(1, max_tasks_per_worker=3) as pool:
        pids = {pool.submit(_count_inits, i).result()[0] for i in range(7)}
    assert len(pids) == 3


def _slow(x):
    time.sleep(0.2)
    return x


def test_shutdown_after_cancelling_queued_tasks_returns():
    pool = WorkerPool(2)
    futs = [pool.submit(_slow, i) for i in range(20)]
    futs[0].result(timeout=60)
    for f in futs:
        f.cancel()
    done = []
    import threading

    t = threading.Thread(target=lambda: (pool.shutdown(wait=True), done.append(True)), daemon=True)
    t.start()
    t.join(60)
    assert done == [True]
    assert sum(f.cancelled() for f in futs) >= 15
