"""The systemd unit template: placeholders, restart policy, hardening, and the agent flags it uses exist."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from edgeexit.cli import build_parser

UNIT = Path(__file__).resolve().parents[1] / "devices" / "edgeexit-agent.service"


def test_unit_template_is_hardened_and_restarts_on_failure():
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    svc = cp["Service"]
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    for key in ("NoNewPrivileges", "DynamicUser", "PrivateTmp", "ProtectKernelTunables"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict" and cp["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "@VENV@/bin/edgeexit" and argv[1:3] == ["agent", "@BUNDLE@"]
    args = build_parser().parse_args(argv[1:])  # every flag the unit uses is a real agent flag
    assert args.cloud == "@CLOUD@" and args.listen.startswith("unix:") and args.deadline_ms == 200
