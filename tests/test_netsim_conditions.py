"""Link conditions, traces, outages and the token bucket: parsing, validation and the arithmetic."""

from __future__ import annotations

import pytest

from edgeexit.errors import ConfigError
from edgeexit.hostport import parse_hostport
from edgeexit.testbed.netsim import LinkConditions, Outage, Trace
from edgeexit.testbed.netsim.conditions import resolve
from edgeexit.testbed.netsim.shaping import TokenBucket, piece_size

TRACE = "# comment\nt_seconds,up_mbit,down_mbit,rtt_ms\n0,10,20,40\n2.5,1,2,200\n"


def test_trace_parses_and_steps(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(TRACE)
    trace = Trace.load(path)
    assert trace.at(0).up_mbit == 10 and trace.at(2.49).down_mbit == 20
    assert trace.at(2.5).rtt_ms == 200 and trace.at(1e6).up_mbit == 1  # the last row holds
    assert Trace.parse(trace.to_csv()) == trace


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t,up,down,rtt\n0,1,1,1\n", "header"),
        ("t_seconds,up_mbit,down_mbit,rtt_ms\n", "at least one row"),
        ("t_seconds,up_mbit,down_mbit,rtt_ms\n1,1,1,1\n", "start at t_seconds=0"),
        ("t_seconds,up_mbit,down_mbit,rtt_ms\n0,1,1,1\n0,2,2,2\n", "increase strictly"),
        ("t_seconds,up_mbit,down_mbit,rtt_ms\n0,1,1\n", "3 cells"),
        ("t_seconds,up_mbit,down_mbit,rtt_ms\n0,fast,1,1\n", "non-number"),
        ("t_seconds,up_mbit,down_mbit,rtt_ms\n0,-1,1,1\n", ">= 0"),
    ],
)
def test_bad_traces_say_what_to_fix(text, message):
    with pytest.raises(ConfigError, match=message):
        Trace.parse(text)


def test_missing_trace_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read trace"):
        Trace.load(tmp_path / "nope.csv")


def test_conditions_validation():
    with pytest.raises(ConfigError, match="delay_ms"):
        LinkConditions(delay_ms=-1)
    with pytest.raises(ConfigError, match="up_mbit"):
        LinkConditions(up_mbit=float("nan"))
    with pytest.raises(ConfigError, match="trace sets bandwidth"):
        LinkConditions(up_mbit=5, trace=Trace.parse(TRACE))


def test_outage_parse_and_validation():
    assert Outage.parse("5:2") == Outage(5, 2, "blackhole")
    assert Outage.parse("0.5:1.5:reset") == Outage(0.5, 1.5, "reset")
    for bad in ("5", "a:b", "1:0", "1:2:flaky", "-1:2"):
        with pytest.raises(ConfigError):
            Outage.parse(bad)


def test_resolve_trace_outages_and_manual_override():
    conditions = LinkConditions(jitter_ms=4, trace=Trace.parse(TRACE), outages=(Outage(1, 1, "reset"),))
    eff = resolve(conditions, 0.5)
    assert eff.up_bytes_per_s == 10e6 / 8 and eff.down_bytes_per_s == 20e6 / 8
    assert eff.delay_s == pytest.approx(0.020) and eff.jitter_s == pytest.approx(0.004) and eff.outage is None
    assert resolve(conditions, 1.5).outage == "reset"
    assert resolve(conditions, 2.0).outage is None
    assert resolve(conditions, 3.0, manual_outage="blackhole").outage == "blackhole"
    assert resolve(LinkConditions(), 0).up_bytes_per_s is None


def test_hostport():
    assert parse_hostport("127.0.0.1:80", "x") == ("127.0.0.1", 80)
    assert parse_hostport("[::1]:0", "x") == ("::1", 0)
    for bad in ("localhost", ":80", "h:99999", "h:port"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_hostport(bad, "--target")


def test_token_bucket_paces_at_the_rate_and_keeps_capacity_when_late():
    bucket = TokenBucket()
    rate = 1000.0  # bytes/s
    departures = [bucket.schedule(100, 0.0, rate) for _ in range(10)]
    assert departures[-1] == pytest.approx(1.0)  # 1000 bytes at 1000 B/s
    # Data that became available earlier is scheduled from then, not from when the relay got round to it.
    assert bucket.schedule(100, 0.5, rate) == pytest.approx(1.1)


def test_token_bucket_burst_credit_only_when_idle():
    bucket = TokenBucket()
    assert bucket.schedule(500, 10.0, 1000.0, burst=500) == pytest.approx(10.0)  # within the burst: no wait
    assert bucket.schedule(500, 10.0, 1000.0, burst=500) == pytest.approx(10.5)  # credit used up
    assert bucket.backlog(10.0) == pytest.approx(0.5)


def test_piece_size_bounds():
    assert piece_size(None) == 64 * 1024
    assert piece_size(1000.0) == 512
    assert piece_size(10e6 / 8) == int(10e6 / 8 * 0.005)
