"""Options check themselves when made (``__post_init__`` raising ConfigError that names the fix), so the CLI,
the agent and library users get the same refusal before anything is loaded or bound."""

from __future__ import annotations

import pytest

from edgeexit.cli import main
from edgeexit.errors import ConfigError
from edgeexit.runtime.adaptation import AdaptOptions
from edgeexit.runtime.agent import AgentOptions
from edgeexit.runtime.breaker import BreakerOptions, RetryOptions
from edgeexit.runtime.device import DeviceOptions
from edgeexit.runtime.oip_server import ServerOptions


@pytest.mark.parametrize("kwargs, match", [
    (dict(on_failure="panic"), "on_failure"),
    (dict(deadline_ms=0), "deadline_ms"),
    (dict(deadline_ms=float("nan")), "deadline_ms"),
    (dict(threads=0), "threads"),
    (dict(split="middle"), "not a number"),
    (dict(split=-1), "negative"),
    (dict(adapt="greedy"), "adapt mode"),
    (dict(slowdown=0.5), "slowdown"),
    (dict(encoding="bf16"), "encoding"),
])
def test_device_options_refuse_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DeviceOptions(**kwargs)


def test_device_options_parse_a_numeric_split_and_share_their_adapter_fields():
    o = DeviceOptions(split="2", adapt="bandit", network="lte", slowdown=3.0, encoding="fp16")
    assert o.split == 2
    a = o.adapt_options()
    assert (a.mode, a.network, a.slowdown, a.encoding) == ("bandit", "lte", 3.0, "fp16")
    assert DeviceOptions(split="device").split == "device"


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="greedy"), "adapt mode"),
    (dict(hysteresis=0), "hysteresis"),
    (dict(probe_interval_s=5.0, max_probe_interval_s=1.0), "probe intervals"),
    (dict(min_samples=0), "min_samples"),
    (dict(mu=-1.0), "mu"),
])
def test_adapt_options_refuse_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdaptOptions(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: RetryOptions(retries=-1), "--retries"),
    (lambda: RetryOptions(backoff_s=1.0, max_backoff_s=0.5), "backoff"),
    (lambda: BreakerOptions(failure_threshold=0), "--breaker-failures"),
    (lambda: BreakerOptions(cooldown_s=-1), "--breaker-cooldown-s"),
    (lambda: ServerOptions(tls_cert="server.pem"), "both --tls-cert and --tls-key"),
    (lambda: ServerOptions(tls_client_ca="ca.pem"), "mTLS"),
    (lambda: ServerOptions(workers=0), "workers"),
    (lambda: ServerOptions(port=70000), "not a TCP port"),
    (lambda: AgentOptions(listen="8001"), "HOST:PORT"),
    (lambda: AgentOptions(workers=0), "workers"),
    (lambda: AgentOptions(metrics_port=-2), "not a TCP port"),
    (lambda: AgentOptions(grace_s=-1), "grace_s"),
])
def test_retry_breaker_server_and_agent_options_refuse_bad_values(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_agent_options_build_the_server_options_they_checked():
    s = AgentOptions(listen="127.0.0.1:0", workers=2, metrics_port=0).server_options()
    assert (s.host, s.port, s.workers, s.metrics_port, s.server_name) == ("127.0.0.1", 0, 2, 0, "edgeexit-agent")
    assert AgentOptions(listen="unix:/tmp/x.sock").server_options().host == "127.0.0.1"


@pytest.mark.parametrize("flag, value, match", [
    ("--retries", "-1", "--retries"),
    ("--breaker-failures", "0", "--breaker-failures"),
    ("--threads", "0", "threads"),
    ("--deadline-ms", "0", "deadline_ms"),
    ("--split", "middle", "not a number"),
])
def test_the_agent_cli_reports_the_options_own_errors(flag, value, match, capsys, tmp_path):
    # The options refuse before the bundle is opened, so a path that does not exist is never reached.
    rc = main(["agent", str(tmp_path / "absent.edgeexit"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err
    assert match in err
