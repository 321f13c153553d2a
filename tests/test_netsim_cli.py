"""`edgeexit netsim` as a real process: announces its address, relays with delay, stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

from tests.fixtures_netsim import ping


def test_cli_relays_with_delay_and_stops_on_sigterm(echo_server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("t_seconds,up_mbit,down_mbit,rtt_ms\n0,50,50,80\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeexit", "netsim", "--target", f"{echo_server[0]}:{echo_server[1]}",
         "--trace", str(trace), "--outage", "30:1:reset"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"relaying 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:(\d+)\n", line)
        assert m and int(m.group(2)) == echo_server[1], line
        with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=5) as sock:
            rtts = [ping(sock) for _ in range(3)]
        assert min(rtts) >= 0.080  # the trace's 80 ms RTT
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "bytes_up=3" in out and "bytes_down=3" in out


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    cases = [
        ["--target", "nowhere"],
        ["--target", "127.0.0.1:1", "--outage", "3"],
        ["--target", "127.0.0.1:1", "--trace", str(tmp_path / "missing.csv")],
        ["--target", "127.0.0.1:1", "--delay-ms", "-5"],
    ]
    for args in cases:
        done = subprocess.run([sys.executable, "-m", "edgeexit", "netsim", *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and "edgeexit netsim: error:" in done.stderr
