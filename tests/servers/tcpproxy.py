"""A loopback TCP proxy for fault tests: forwards to a server and can cut a connection.

``proxy.cut_after(n)`` arms one cut: once ``n`` more bytes have gone from the server to a
client, that connection is closed on both sides (the bytes up to ``n`` are delivered). Later
connections pass through untouched. ``connections`` counts accepted clients, ``cuts`` the
cuts made.
"""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """Forwards ``127.0.0.1:port`` to ``(host, target_port)``; use as a context manager."""

    def __init__(self, host: str, target_port: int):
        self.target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self.cuts = 0
        self._budget: int | None = None
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def cut_after(self, nbytes: int) -> None:
        """Cut the connection that carries the next ``nbytes`` server-to-client bytes."""
        with self._lock:
            self._budget = nbytes

    def close(self) -> None:
        """Stop accepting and close every open connection."""
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._open:
                _close(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                cut = False
                if from_server:
                    with self._lock:
                        if self._budget is not None:
                            if len(data) >= self._budget:
                                data, cut = data[: self._budget], True
                                self._budget = None
                                self.cuts += 1
                            else:
                                self._budget -= len(data)
                dst.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
