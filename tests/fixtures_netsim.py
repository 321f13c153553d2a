"""Real TCP endpoints on 127.0.0.1 (threads) for the netsim tests: echo, sink (records arrival times), source."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

CHUNK = 64 * 1024


def _serve(handler) -> tuple[socket.socket, tuple[str, int]]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)

    def accept_loop() -> None:
        while srv.fileno() != -1:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return srv, srv.getsockname()[:2]


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(CHUNK):
                conn.sendall(data)
        except OSError:
            pass


@dataclass
class Sink:
    """Accepts connections, reads to EOF; ``timeline`` holds (monotonic time, total bytes) per received chunk."""

    address: tuple[str, int] = ("", 0)
    timeline: list[tuple[float, int]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    total: int = 0

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(CHUNK):
                    self.total += len(data)
                    self.timeline.append((time.monotonic(), self.total))
            except OSError:
                pass
        self.done.set()

    def bytes_at(self, t: float) -> int:
        """Total bytes received up to monotonic time ``t``."""
        seen = [n for when, n in self.timeline if when <= t]
        return seen[-1] if seen else 0


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    srv, addr = _serve(_echo)
    yield addr
    srv.close()


@pytest.fixture
def sink_server() -> Iterator[Sink]:
    sink = Sink()
    srv, sink.address = _serve(sink.handle)
    yield sink
    srv.close()


@pytest.fixture
def source_server() -> Iterator[tuple[tuple[str, int], int]]:
    """Sends ``NBYTES`` to whoever connects, then closes; yields (address, NBYTES)."""
    nbytes = 2_000_000

    def send(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"\x5a" * nbytes)
            except OSError:
                pass

    srv, addr = _serve(send)
    yield addr, nbytes
    srv.close()


def ping(sock: socket.socket) -> float:
    """One 1-byte round trip through an echo server, in seconds."""
    t = time.monotonic()
    sock.sendall(b"p")
    if sock.recv(1) != b"p":
        raise ConnectionError("the echo server closed the connection")
    return time.monotonic() - t
