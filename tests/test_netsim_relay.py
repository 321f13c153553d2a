"""The relay, measured for real on loopback: bandwidth, delay, jitter, outages, run-time changes, traces."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time

import pytest

from edgeexit.errors import ConfigError
from edgeexit.testbed.netsim import LinkConditions, Outage, Relay, Trace
from tests.fixtures_netsim import ping


def _send_all(address: tuple[str, int], nbytes: int) -> float:
    """Send ``nbytes`` and half-close from a background thread; returns the monotonic start time."""
    sock = socket.create_connection(address)
    start = time.monotonic()
    threading.Thread(target=_send_and_close, args=(sock, nbytes), daemon=True).start()
    return start


def _send_and_close(sock: socket.socket, nbytes: int) -> None:
    with sock:
        try:
            sock.sendall(b"\0" * nbytes)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # returns when the far end closes (or the relay shuts down)
        except OSError:
            pass


def _connect_and_read(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=2) as sock:
        if not sock.recv(1):
            raise ConnectionResetError("closed without data")


def test_up_bandwidth_10mbit_within_15_percent(sink_server):
    nbytes = 2_000_000
    with Relay(sink_server.address, LinkConditions(up_mbit=10)) as relay:
        start = _send_all(relay.address, nbytes)
        assert sink_server.done.wait(10)
        mbit = nbytes * 8 / (sink_server.timeline[-1][0] - start) / 1e6
        assert relay.stats.bytes_up == nbytes
    assert sink_server.total == nbytes
    assert 8.5 <= mbit <= 11.5, f"{mbit:.2f} Mbit/s through a 10 Mbit/s relay"


def test_down_bandwidth_is_shaped_separately(source_server):
    address, nbytes = source_server
    with Relay(address, LinkConditions(up_mbit=1, down_mbit=20)) as relay:
        sock = socket.create_connection(relay.address)
        start, got = time.monotonic(), 0
        while data := sock.recv(65536):
            got += len(data)
        mbit = got * 8 / (time.monotonic() - start) / 1e6
        sock.close()
    assert got == nbytes
    assert 17 <= mbit <= 23, f"{mbit:.2f} Mbit/s through a 20 Mbit/s downlink"


def test_a_message_after_an_idle_spell_takes_the_links_time(echo_server):
    """Idle time is no credit (burst 0): 256 KiB sent on an open connection after 1 s of silence crosses a
    4 Mbit/s uplink in >= its serialisation time. (The shaper once credited a full first read with the idle
    spell, carrying 64 KiB for free.)"""
    nbytes, rate = 256 * 1024, 4e6 / 8
    with Relay(echo_server, LinkConditions(up_mbit=4)) as relay, \
            socket.create_connection(relay.address, timeout=10) as sock:
        ping(sock)
        time.sleep(1.0)
        start = time.monotonic()
        threading.Thread(target=sock.sendall, args=(b"\1" * nbytes,), daemon=True).start()
        got = 0
        while got < nbytes:
            got += len(sock.recv(65536))
        took = time.monotonic() - start
    assert took >= 0.95 * nbytes / rate, f"{nbytes} B in {took:.3f} s through a {rate * 8 / 1e6:.0f} Mbit/s uplink"


def test_50ms_one_way_delay_adds_100ms_rtt(echo_server):
    with Relay(echo_server) as plain, Relay(echo_server, LinkConditions(delay_ms=50)) as delayed:
        a, b = socket.create_connection(plain.address), socket.create_connection(delayed.address)
        base = statistics.median(ping(a) for _ in range(5))
        rtts = [ping(b) for _ in range(5)]
        a.close(), b.close()
    assert min(rtts) >= 0.100
    assert statistics.median(rtts) - base >= 0.095
    assert statistics.median(rtts) < 0.300  # sanity: the delay is not stacked per chunk


def test_jitter_varies_rtt_without_reordering_bytes(echo_server):
    payload = os.urandom(300_000)
    conditions = LinkConditions(delay_ms=20, jitter_ms=15, up_mbit=40, down_mbit=40)
    with Relay(echo_server, conditions) as relay:
        sock = socket.create_connection(relay.address)
        rtts = [ping(sock) for _ in range(12)]
        threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
        back = bytearray()
        sock.settimeout(10)
        while len(back) < len(payload):
            back += sock.recv(65536)
        sock.close()
    assert bytes(back) == payload  # jittered chunks never overtake each other
    assert min(rtts) >= 0.010  # 2 x (20 - 15) ms at least
    assert max(rtts) - min(rtts) > 0.005


def test_blackhole_stalls_open_and_new_connections_then_resumes(echo_server):
    with Relay(echo_server) as relay:
        sock = socket.create_connection(relay.address)
        ping(sock)
        relay.outage(seconds=1.0, mode="blackhole")
        sock.settimeout(0.6)
        sock.sendall(b"q")
        with pytest.raises(TimeoutError):
            sock.recv(1)  # stalled, not closed
        fresh = socket.create_connection(relay.address, timeout=1)  # accepted during the outage
        fresh.sendall(b"f")
        sock.settimeout(2)
        assert sock.recv(1) == b"q"  # delivered once the link is back, connection still open
        fresh.settimeout(2)
        assert fresh.recv(1) == b"f"
        assert relay.stats.drops == 0
        sock.close(), fresh.close()


def test_reset_outage_drops_open_connections_and_refuses_new(echo_server):
    with Relay(echo_server) as relay:
        sock = socket.create_connection(relay.address)
        ping(sock)
        relay.outage(seconds=0.8, mode="reset")
        sock.settimeout(1)
        with pytest.raises(ConnectionResetError):
            for _ in range(20):  # the reset arrives within a tick or two
                sock.sendall(b"x")
                if not sock.recv(1):
                    raise ConnectionResetError("closed")
                time.sleep(0.02)
        with pytest.raises(ConnectionResetError):
            _connect_and_read(relay.address)
        time.sleep(0.9)
        again = socket.create_connection(relay.address, timeout=1)
        again.settimeout(2)
        assert ping(again) < 1.0
        stats = relay.stats
        assert stats.connections_reset == 1 and stats.connections_refused == 1 and stats.drops == 2
        sock.close(), again.close()


def test_scheduled_outage_in_conditions(echo_server):
    conditions = LinkConditions(outages=(Outage(start=0.3, duration=0.6, mode="blackhole"),))
    with Relay(echo_server, conditions) as relay:
        sock = socket.create_connection(relay.address)
        sock.settimeout(3)
        assert ping(sock) < 0.2
        time.sleep(0.35)
        assert ping(sock) >= 0.4  # waits for the end of the outage at 0.9 s


def test_rate_change_applies_to_bytes_in_flight(sink_server):
    nbytes = 1_000_000  # 8 s at 1 Mbit/s
    with Relay(sink_server.address, LinkConditions(up_mbit=1)) as relay:
        start = _send_all(relay.address, nbytes)
        time.sleep(0.3)
        relay.set(LinkConditions())
        assert sink_server.done.wait(5)
    assert sink_server.total == nbytes
    assert sink_server.timeline[-1][0] - start < 1.5


def test_rate_change_on_an_open_connection(sink_server):
    sock = None
    with Relay(sink_server.address, LinkConditions(up_mbit=20)) as relay:
        sock = socket.create_connection(relay.address)
        sock.sendall(b"\0" * 1_000_000)  # 0.4 s at 20 Mbit/s
        deadline = time.monotonic() + 5
        while sink_server.total < 1_000_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        relay.set(LinkConditions(up_mbit=5))
        t0, n0 = time.monotonic(), sink_server.total
        sock.sendall(b"\0" * 500_000)  # 0.8 s at 5 Mbit/s
        sock.shutdown(socket.SHUT_WR)
        assert sink_server.done.wait(5)
        mbit = (sink_server.total - n0) * 8 / (sink_server.timeline[-1][0] - t0) / 1e6
        sock.close()
    assert 4.25 <= mbit <= 5.75, f"{mbit:.2f} Mbit/s after changing to 5"


def test_trace_changes_rate_over_time(sink_server):
    trace = Trace.parse("t_seconds,up_mbit,down_mbit,rtt_ms\n0,16,16,0\n0.6,2,2,0\n")
    with Relay(sink_server.address, LinkConditions(trace=trace)) as relay:
        start = _send_all(relay.address, 2_500_000)
        time.sleep(1.4)
        fast = (sink_server.bytes_at(start + 0.5) - sink_server.bytes_at(start + 0.1)) * 8 / 0.4 / 1e6
        slow = (sink_server.bytes_at(start + 1.3) - sink_server.bytes_at(start + 0.8)) * 8 / 0.5 / 1e6
        relay.set(LinkConditions())  # let the rest through quickly
        assert sink_server.done.wait(5)
    assert 12 <= fast <= 20, f"{fast:.2f} Mbit/s in the 16 Mbit/s step"
    assert 1.4 <= slow <= 2.6, f"{slow:.2f} Mbit/s in the 2 Mbit/s step"


def test_sixteen_concurrent_connections(echo_server):
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with socket.create_connection(relay.address, timeout=5) as s:
                for _ in range(5):
                    ping(s)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    with Relay(echo_server, LinkConditions(delay_ms=5, up_mbit=50, down_mbit=50)) as relay:
        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert relay.stats.connections == 16
    assert not errors


def test_target_down_resets_the_client():
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))  # bound but not listening: connects are refused, and the port stays ours
    with bound, Relay(bound.getsockname()) as relay:
        with pytest.raises(ConnectionResetError):  # the reset may even beat connect() back to the client
            _connect_and_read(relay.address)
        assert relay.stats.connections_refused == 1


def test_control_errors_are_config_errors(echo_server):
    relay = Relay(echo_server)
    with pytest.raises(ConfigError, match="not running"):
        relay.address  # noqa: B018
    with pytest.raises(ConfigError, match="mode"):
        relay.outage(1.0, mode="flaky")
    with relay:
        busy = relay.address
        with pytest.raises(ConfigError, match="cannot listen"):
            Relay(echo_server, listen=busy).start()


def test_relaying_to_itself_is_refused():
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(ConfigError, match="relay to itself"):
        Relay(("127.0.0.1", port), listen=("127.0.0.1", port)).start()
