"""One logging path (edgeexit.logs): JSON lines for the agent and the service, third-party noise hidden unless
verbose, progress as one line per phase off a terminal, and a real agent whose every stderr line is JSON."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import warnings

import numpy as np
import pytest

from edgeexit import logs
from edgeexit.bundle import Bundle
from edgeexit.testbed.harness import AgentClient, free_port, launch


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_events_and_plain_records(restore_logging):
    buf = io.StringIO()
    logs.configure(json=True, stream=buf)
    device = logging.getLogger("edgeexit.runtime.device")
    device.info("offload failed, falling back (%s)", "LinkTimeout")
    device.warning("circuit %s -> %s", "closed", "open")
    logs.event(logging.getLogger("edgeexit.runtime.agent"), "fallback", rows=3, level="not the record's level")
    info, warning, fallback = _lines(buf)
    assert info["event"] == "log" and info["level"] == "info" and info["msg"] == "offload failed, falling back " \
        "(LinkTimeout)" and info["logger"] == "edgeexit.runtime.device"
    assert warning["level"] == "warning" and warning["msg"] == "circuit closed -> open"
    assert fallback["event"] == "fallback" and fallback["rows"] == 3 and fallback["level"] == "info"
    assert '"event": "fallback"' in buf.getvalue()  # the spelling log readers (and the scenario tests) count


def test_third_party_noise_needs_verbose(restore_logging):
    buf = io.StringIO()
    logs.configure(stream=buf, prog="export")
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    logging.getLogger("grpc._server").error("a real failure")
    logging.getLogger("edgeexit.exporters.export").info("segment 0/2: ONNX")
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    text = buf.getvalue()
    assert "mxfp8" not in text and "LeafSpec" not in text
    assert "ERROR: a real failure" in text and "] segment 0/2: ONNX" in text and text.startswith("[export ")
    buf = io.StringIO()
    logs.configure(stream=buf, verbose=True)  # replaces the first handler: one line per record
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert "mxfp8" in buf.getvalue() and "LeafSpec" in buf.getvalue()
    assert len([h for h in logging.getLogger().handlers if isinstance(h, logs._Stderr)]) == 1


def test_native_output_is_hidden_but_our_lines_are_not(restore_logging, capfd):
    logs.configure(prog="export")
    with logs.native_output_hidden():
        os.write(2, b"I0000 flatbuffer_export.cc] Estimated count of arithmetic ops\n")
        print("FutureWarning from a library", file=sys.__stderr__, flush=True)  # what fd 2 gets in a real process
        logging.getLogger("edgeexit.exporters.export").info("validating every exit")
    err = capfd.readouterr().err
    assert "Estimated count" not in err and "FutureWarning" not in err and "validating every exit" in err
    # After a crash the hidden text is shown after all: it may say why.
    with pytest.raises(RuntimeError), logs.native_output_hidden():
        os.write(2, b"converter: segfault ahead\n")
        raise RuntimeError("boom")
    assert "segfault ahead" in capfd.readouterr().err
    os.write(2, b"after\n")  # stderr is back
    assert capfd.readouterr().err == "after\n"


def test_progress_off_a_terminal_is_one_line_per_phase(restore_logging):
    buf = io.StringIO()
    logs.configure(stream=buf, prog="evaluate")
    with logs.ProgressBar(100, True, "full model") as bar:  # pytest's stderr is no terminal
        for _ in range(10):
            bar.update(10)
    with logs.ProgressBar(5, False, "quiet") as bar:
        bar.update(5)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and "full model: 100/100 img in" in lines[0]


def test_a_real_agent_writes_only_json_lines_warnings_and_info_included(agent_bundle, tmp_path, raw_batch):
    # A dead cloud: the request falls back, and the device runtime logs (info) and opens its circuit (warning).
    args = ["agent", str(agent_bundle), "--cloud", f"127.0.0.1:{free_port()}", "--split", "0", "--policy", "never",
            "--listen", "127.0.0.1:0", "--breaker-failures", "1", "--deadline-ms", "300"]
    with launch("agent", args, tmp_path) as agent:
        with AgentClient(agent.target, Bundle.load(agent_bundle).name) as app:
            ans = app.infer(raw_batch)
        assert set(ans.decided) == {"device-fallback"} and np.isfinite(ans.probabilities).all()
        assert agent.stop() == 0
    text = agent.log().splitlines()  # stderr, plus the "ready on" line of stdout
    assert [line for line in text if not line.startswith("{")] == [f"ready on {agent.target}"]
    lines = [json.loads(line) for line in text if line.startswith("{")]
    events = [e["event"] for e in lines]
    assert events[0] == "start" and events[-1] == "stop" and "fallback" in events and "circuit" in events
    device = [e for e in lines if e.get("logger", "").startswith("edgeexit") and "device" in e["logger"]]
    assert {e["level"] for e in device} >= {"info", "warning"}, device
