"""Network-namespace harness, for real (root, as in CI): kernel-shaped veth throughput, run-time rate changes,
a relay inside the device namespace, and teardown that leaves nothing behind. Skipped with the reason elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from edgeexit.errors import ConfigError
from edgeexit.testbed.netsim.namespaces import NetnsLink, available, cleanup_stale

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network namespaces unavailable: {WHY}")
PY = sys.executable


def _listing() -> str:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return ns + links


def _measure(link: NetnsLink, sender: str, receiver_ip: str, mbit: float, seconds: float = 1.2) -> float:
    receiver = "cloud" if sender == "dev" else "dev"
    sink = link.run(receiver, [PY, "-m", "edgeexit.testbed.netsim.probe", "sink", f"{receiver_ip}:5001"],
                    stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "listening"
    nbytes = int(mbit * 1e6 / 8 * seconds)
    source = link.run(sender, [PY, "-m", "edgeexit.testbed.netsim.probe", "source", f"{receiver_ip}:5001", str(nbytes)])
    assert source.wait(30) == 0
    result = json.loads(sink.stdout.readline())
    sink.wait(5)
    assert result["bytes"] == nbytes
    return result["mbit"]


def test_available_says_why():
    ok, why = available()
    assert ok is True and why == ""


def test_kernel_shaping_within_20_percent_both_ways_and_at_run_time():
    with NetnsLink(up_mbit=10, down_mbit=20) as link:
        assert link.dev_ip.startswith("10.200.") and link.cloud_ip.startswith("10.200.")
        up = _measure(link, "dev", link.cloud_ip, 10)
        down = _measure(link, "cloud", link.dev_ip, 20)
        link.set_rate(4, None)
        slower = _measure(link, "dev", link.cloud_ip, 4)
    assert 8 <= up <= 12, f"up {up:.2f} Mbit/s at 10"
    assert 16 <= down <= 24, f"down {down:.2f} Mbit/s at 20"
    assert 3.2 <= slower <= 4.8, f"up {slower:.2f} Mbit/s after set_rate(4)"


ECHO = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], 5002)); print("listening", flush=True)
    c, _ = srv.accept()
    while d := c.recv(65536): c.sendall(d)
""")
PING = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    rtts = []
    for _ in range(5):
        t = time.monotonic(); s.sendall(b"p"); assert s.recv(1) == b"p"; rtts.append(time.monotonic() - t)
    print(min(rtts), flush=True)
""")


def test_relay_inside_the_device_namespace_adds_delay():
    with NetnsLink(up_mbit=20, down_mbit=20) as link:
        echo = link.run("cloud", [PY, "-c", ECHO, link.cloud_ip], stdout=subprocess.PIPE, text=True)
        assert echo.stdout.readline().strip() == "listening"
        relay = link.run("dev", [PY, "-m", "edgeexit", "netsim", "--target", f"{link.cloud_ip}:5002",
                                 "--delay-ms", "25"], stdout=subprocess.PIPE, text=True)
        port = relay.stdout.readline().split()[1].rsplit(":", 1)[1]
        client = link.run("dev", [PY, "-c", PING, port], stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=30)
    assert float(out) >= 0.050  # 2 x 25 ms across the namespaces


def test_teardown_leaves_nothing_even_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"), NetnsLink(up_mbit=5) as link:
        sleeper = link.run("dev", ["sleep", "30"])
        names = (link.dev_ns, link.cloud_ns, link.dev_if, link.cloud_if)
        assert link.dev_ns in _listing()
        raise RuntimeError("boom")
    assert sleeper.poll() is not None  # processes started in the namespace were stopped
    listing = _listing()
    assert not [n for n in names if n in listing]


def test_stale_namespaces_of_dead_runs_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"ee-{dead.pid}-0-dev"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
        assert stale not in _listing()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_bad_rates_and_namespaces_are_config_errors():
    with pytest.raises(ConfigError, match="Relay outage"):
        NetnsLink(up_mbit=0)
    link = NetnsLink()
    with pytest.raises(ConfigError, match="not up"):
        link.run("dev", ["true"])
    with pytest.raises(ConfigError, match="'dev' or 'cloud'"):
        link.namespace("edge")


CTRL_C = textwrap.dedent("""
    import os, signal, time
    from edgeexit.testbed.netsim.namespaces import NetnsLink
    # A parent that ignores SIGINT (a background job of a non-interactive shell) passes that on, and Python then
    # installs no KeyboardInterrupt handler: restore it, as a terminal's Ctrl-C would find it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with NetnsLink(up_mbit=5) as link:
        print(link.dev_ns, link.cloud_ns, link.dev_if, link.cloud_if, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
""")


def test_teardown_after_ctrl_c():
    done = subprocess.run([PY, "-c", CTRL_C], capture_output=True, text=True, timeout=60)
    names = done.stdout.split()
    assert len(names) == 4 and "KeyboardInterrupt" in done.stderr
    listing = _listing()
    assert not [n for n in names if n in listing]
