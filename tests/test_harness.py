"""The process harness: real serve + agent processes, an app-side client, clean stops."""

import numpy as np
import pytest

from edgeexit.errors import ConfigError
from edgeexit.runtime.runner import SegmentRunner
from edgeexit.testbed.harness import AgentClient, launch


@pytest.mark.slow
def test_serve_and_agent_answer_like_the_local_bundle(tiny_bundle, tmp_path):
    runner = SegmentRunner(tiny_bundle)
    x = np.random.default_rng(3).random((4, 1, 28, 28), dtype=np.float32)
    want = runner.run_all(runner.normalize(x))[-1].argmax(1)
    with launch("serve", ["serve", str(tiny_bundle), "--port", "0"], tmp_path) as serve:
        agent_args = ["agent", str(tiny_bundle), "--cloud", serve.target, "--split", "0", "--policy", "never",
                      "--listen", "127.0.0.1:0"]
        with launch("agent", agent_args, tmp_path) as agent, \
                AgentClient(agent.target, runner.manifest.name) as app:
            ans = app.infer(x)
            assert ans.decided == ["cloud"] * 4
            np.testing.assert_array_equal(ans.labels, want)
        assert agent.popen.returncode == 0 and '"event": "stop"' in agent.log()
    assert serve.popen.returncode == 0


def test_a_process_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ConfigError, match="did not become ready"):
        launch("serve", ["serve", str(tmp_path / "missing.edgeexit")], tmp_path, timeout=30)
