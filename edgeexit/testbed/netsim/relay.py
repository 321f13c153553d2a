"""`Relay`: a userspace TCP relay that imposes `LinkConditions` between a client and a target.

Works without root. The relay runs its own asyncio loop in a background thread, so tests use it as a context
manager next to blocking code; conditions change at run time (``set``, ``outage``) and apply to connections
that are already open (gRPC keeps one HTTP/2 connection for its whole life).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace

from edgeexit.errors import ConfigError
from edgeexit.testbed.netsim.conditions import OUTAGE_MODES, Effective, LinkConditions, resolve
from edgeexit.testbed.netsim.pipe import TICK, Pipe

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RelayStats:
    """Counters since the relay started. ``bytes_up`` is client->target, ``bytes_down`` target->client
    (delivered bytes). ``connections_reset``: open connections reset by a "reset" outage; ``connections_refused``:
    connections reset at accept (reset outage) or because the target refused/timed out."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    connections_open: int = 0
    connections_reset: int = 0
    connections_refused: int = 0

    @property
    def drops(self) -> int:
        return self.connections_reset + self.connections_refused


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), the way a middlebox or a crashed peer ends a connection."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.writers = (client, server)
        self.tasks: tuple[asyncio.Future, ...] = ()

    def reset(self) -> None:
        for w in self.writers:
            _rst(w)
        for t in self.tasks:
            t.cancel()


class Relay:
    """Relay TCP connections from ``listen`` (default 127.0.0.1, any free port) to ``target``.

    >>> with Relay(target=("127.0.0.1", 8001), conditions=LinkConditions(delay_ms=20, up_mbit=10)) as relay:
    ...     host, port = relay.address
    """

    def __init__(
        self,
        target: tuple[str, int],
        conditions: LinkConditions | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.target = (target[0], int(target[1]))
        self._listen = listen
        self._applied = (conditions or LinkConditions(), time.monotonic())
        self._manual: tuple[str, float] | None = None  # (mode, until)
        self._stats = RelayStats()
        self._address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._ready = threading.Event()
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task] = set()

    # ---- control (any thread) -------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise ConfigError("the relay is not running; use it as a context manager or call start() first")
        return self._address

    @property
    def conditions(self) -> LinkConditions:
        return self._applied[0]

    @property
    def stats(self) -> RelayStats:
        return self._stats

    def set(self, conditions: LinkConditions) -> None:
        """Replace the conditions now; open connections follow within ~``TICK``. Trace/outage times restart."""
        self._applied = (conditions, time.monotonic())  # one tuple: readers never see a half-applied change

    def outage(self, seconds: float, mode: str = "blackhole") -> None:
        """Start an outage now, lasting ``seconds`` (returns at once; see `Outage` for the modes)."""
        if mode not in OUTAGE_MODES:
            raise ConfigError(f"outage mode {mode!r} is unknown; use one of {', '.join(OUTAGE_MODES)}")
        if not seconds > 0:
            raise ConfigError(f"outage seconds must be > 0, got {seconds}")
        self._manual = (mode, time.monotonic() + seconds)

    def effective(self) -> Effective:
        """The link as it is right now."""
        conditions, applied_at = self._applied
        now = time.monotonic()
        manual = self._manual
        mode = manual[0] if manual is not None and now < manual[1] else None
        return resolve(conditions, now - applied_at, mode)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> Relay:
        if self._thread is not None:
            raise ConfigError("this relay is already running; create a new Relay to relay again")
        self._thread = threading.Thread(target=self._thread_main, name=f"relay->{self.target}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            host, port = self._listen
            raise ConfigError(
                f"the relay cannot listen on {host}:{port}: {self._startup_error}; pick a free port or 0"
            ) from self._startup_error
        return self

    def close(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=10)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the loop thread -------------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start(); after startup the loop only ends via close()
            self._startup_error = self._startup_error or e
            self._ready.set()

    def _count(self, direction: str, n: int) -> None:
        key = "bytes_up" if direction == "up" else "bytes_down"
        self._bump(**{key: getattr(self._stats, key) + n})

    def _bump(self, **changes: int) -> None:
        self._stats = replace(self._stats, **changes)  # a new frozen snapshot: readers never see torn counters

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        host, port = self._listen
        server = await asyncio.start_server(self._accept, host, port)
        self._address = server.sockets[0].getsockname()[:2]
        if self._address[1] == self.target[1] and self.target[0] in (self._address[0], "localhost", "0.0.0.0"):
            server.close()
            raise OSError(f"it would relay to itself ({self.target[0]}:{self.target[1]})")
        self._ready.set()
        try:
            while not self._stopping.is_set():
                if self.effective().outage == "reset" and self._connections:
                    self._reset_all()
                try:
                    await asyncio.wait_for(self._stopping.wait(), TICK)
                except TimeoutError:
                    pass
        finally:
            server.close()
            for conn in list(self._connections):
                conn.reset()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    def _reset_all(self) -> None:
        conns = list(self._connections)
        for conn in conns:
            conn.reset()
        self._connections.difference_update(conns)
        s = self._stats
        self._bump(connections_reset=s.connections_reset + len(conns), connections_open=s.connections_open - len(conns))

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._relay(c_reader, c_writer)
        except asyncio.CancelledError:
            _rst(c_writer)  # shutdown: a handler is a top-level task, so it ends quietly instead of re-raising
        finally:
            self._handlers.discard(task)

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._bump(connections=self._stats.connections + 1)
        while self.effective().outage == "blackhole" and not self._stopping.is_set():
            await asyncio.sleep(TICK)  # accepted but stalled: the target sees nothing until the link is back
        if self.effective().outage == "reset" or self._stopping.is_set():
            _rst(c_writer)
            self._bump(connections_refused=self._stats.connections_refused + 1)
            return
        try:
            s_reader, s_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            _rst(c_writer)  # the target is down: the client sees a reset, as it would without the relay
            self._bump(connections_refused=self._stats.connections_refused + 1)
            return
        conn = _Connection(c_writer, s_writer)
        self._connections.add(conn)
        self._bump(connections_open=self._stats.connections_open + 1)
        up = Pipe("up", c_reader, s_writer, self.effective, self._count)
        down = Pipe("down", s_reader, c_writer, self.effective, self._count)
        conn.tasks = (asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run()))
        try:
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failed = any(t.done() and not t.cancelled() and t.exception() is not None for t in conn.tasks)
            if failed or not all(t.done() for t in conn.tasks):
                conn.reset()  # one side broke (or we are being cancelled): reset the other, as one TCP path would
            else:
                for w in conn.writers:
                    w.close()
            if conn in self._connections:
                self._connections.discard(conn)
                self._bump(connections_open=self._stats.connections_open - 1)
