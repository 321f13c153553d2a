"""The deployment recipes (deploy/, devices/edgeexit-serve.service), checked as far as these machines allow.

No Docker engine, no Kubernetes cluster and no systemd PID 1 here, so nothing is built, applied or started.
What is checked: every YAML document parses with the expected kind/apiVersion; the unit parses and
`systemd-analyze verify` accepts it; every `edgeexit ...` command line in a recipe uses real flags of that
subcommand (parsed by the real CLI); the recipes agree with each other (ports, uid, paths, versions); every
path a Dockerfile COPYs exists; and the probe script answers against a real `edgeexit serve`, TLS included.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from edgeexit.cli import build_parser
from edgeexit.runtime.oip_server import ServerOptions

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = ROOT / "devices" / "edgeexit-serve.service"
SERVE_DOCKERFILE = DEPLOY / "serve.Dockerfile"
TRITON_DOCKERFILE = DEPLOY / "triton.Dockerfile"
K8S = DEPLOY / "k8s" / "serve-deployment.yaml"
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
RECIPES = [UNIT, SERVE_DOCKERFILE, TRITON_DOCKERFILE, K8S, KSERVE, DEPLOY / "README.md", DEPLOY / "healthcheck.py"]
HEALTHCHECK_IN_IMAGE = "/opt/edgeexit/healthcheck.py"


# --- helpers -------------------------------------------------------------------------------------------------

def help_text(sub: str) -> str | None:
    """`edgeexit SUB --help` from the real parser; None when the subcommand does not exist (yet)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        build_parser().parse_args([sub, "--help"])
    return out.getvalue() if exc.value.code == 0 else None


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def instr(path: Path, name: str) -> list[str]:
    return [args for i, args in dockerfile(path) if i == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r} must be the exec (JSON) form: signals reach the process"
    return value


def load_yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def unit() -> configparser.ConfigParser:
    # strict=False: LoadCredential= repeats, as systemd allows; the parser keeps the last, the test reads lines.
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    return cp


def flags_referenced(sub: str) -> dict[str, set[str]]:
    """Flags on `edgeexit SUB ...` lines (continuations joined) in the recipes' text, per file."""
    found: dict[str, set[str]] = {}
    pattern = re.compile(rf"\bedgeexit {re.escape(sub)}(?![\w-])(.*)")
    for path in RECIPES:
        text = re.sub(r"\\\n#?", " ", path.read_text())  # join shell continuations, also inside comments
        for m in pattern.finditer(text):
            flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(1).split("`")[0]))
            if flags:
                found.setdefault(path.name, set()).update(flags)
    return found


def deployment() -> dict:
    return next(d for d in load_yaml(K8S) if d["kind"] == "Deployment")


def serve_container() -> dict:
    return next(c for c in deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == "serve")


def serve_args(argv: list[str]):
    args = build_parser().parse_args(argv)
    assert argv[0] == "serve"
    return args


# --- YAML ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    (K8S, [("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"),
           ("autoscaling/v2", "HorizontalPodAutoscaler")]),
    (KSERVE, [("serving.kserve.io/v1beta1", "InferenceService")]),
], ids=["k8s", "kserve"])
def test_every_yaml_document_parses_with_the_expected_kind(path: Path, expected):
    docs = load_yaml(path)
    assert [(d["apiVersion"], d["kind"]) for d in docs] == expected
    for d in docs:
        assert d["metadata"]["name"] and d["metadata"]["namespace"] == "edgeexit", d["kind"]
    assert "NOT RUN HERE" in path.read_text()


def test_k8s_serve_container_runs_real_serve_flags_with_its_secrets_mounted():
    c = serve_container()
    args = serve_args(c["command"][1:] + c["args"])
    assert c["command"][0] == "edgeexit" and args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert args.metrics_host == "0.0.0.0", "Prometheus scrapes from outside the pod"
    # Every file the service is given lies in a read-only secret mount that projects exactly that key.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    for path in (args.tls_cert, args.tls_key, args.token_file):
        parent, key = path.rsplit("/", 1)
        mount = mounts[parent]
        secret = volumes[mount["name"]]["secret"]
        assert mount["readOnly"] is True and key in {i["path"] for i in secret["items"]}, path
        assert secret["defaultMode"] == 0o440
    bundle_mount = mounts[args.bundle]
    assert bundle_mount["readOnly"] is True
    assert volumes[bundle_mount["name"]]["persistentVolumeClaim"]["readOnly"] is True
    # Probes run the script the image ships, over TLS with a CA that is mounted.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][1] == HEALTHCHECK_IN_IMAGE, probe
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["EDGEEXIT_HEALTH_ADDRESS"] == f"127.0.0.1:{args.port}"
    assert env["EDGEEXIT_HEALTH_TLS_CA"].rsplit("/", 1)[0] in mounts
    # SIGKILL must not cut the drain short.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.drain_seconds + pre_stop


def test_k8s_objects_agree_with_each_other_and_with_the_image():
    docs = {d["kind"]: d for d in load_yaml(K8S)}
    dep = docs["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    names = {p["name"] for p in serve_container()["ports"]}
    assert {p["targetPort"] for p in docs["Service"]["spec"]["ports"]} <= names
    pod = dep["spec"]["template"]["spec"]
    uid = instr(SERVE_DOCKERFILE, "USER")[-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == uid
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert serve_container()["image"].endswith(f":{version}")


def test_kserve_uses_the_triton_runtime_over_grpc_on_the_tested_triton_release():
    model = load_yaml(KSERVE)[0]["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "grpc-v2" and model["ports"][0]["name"] == "h2c"
    assert re.fullmatch(r"(s3|gs|pvc|https)://\S+/model_repository", model["storageUri"])
    triton_tag = instr(TRITON_DOCKERFILE, "FROM")[0].rsplit(":", 1)[1]
    assert model["runtimeVersion"] == triton_tag


# --- systemd ----------------------------------------------------------------------------------------------------

def test_serve_unit_is_hardened_with_a_dedicated_user_and_credentials():
    cp = unit()
    svc = cp["Service"]
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    assert svc["DynamicUser"] == "yes" and svc["User"] == "edgeexit-serve"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "RestrictSUIDSGID"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict" and svc["CapabilityBoundingSet"] == ""
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "@VENV@/bin/edgeexit"
    args = serve_args(argv[1:])
    assert args.bundle == "@BUNDLE@" and args.tls_cert and args.token_file
    # Each secret the service reads comes from a LoadCredential= of the same name (%d = credentials dir).
    creds = {line.split("=", 1)[1].split(":", 1)[0] for line in UNIT.read_text().splitlines()
             if line.startswith("LoadCredential=")}
    for path in (args.tls_cert, args.tls_key, args.token_file):
        assert path.startswith("%d/") and path[3:] in creds, path
    assert float(svc["TimeoutStopSec"]) > args.drain_seconds


def test_serve_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: only the configparser checks above ran")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    filled = tmp_path / "edgeexit-serve.service"
    filled.write_text(UNIT.read_text().replace("@VENV@", str(Path(sys.executable).parent.parent))
                      .replace("@BUNDLE@", str(bundle)))
    assert (Path(sys.executable).parent / "edgeexit").exists(), "the venv has no edgeexit script to point at"
    res = subprocess.run([tool, "verify", str(filled)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys or bad values but says so on stderr: both must be clean.
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


# --- Dockerfiles ---------------------------------------------------------------------------------------------

def test_serve_image_is_slim_non_root_healthchecked_and_copies_real_paths():
    froms = instr(SERVE_DOCKERFILE, "FROM")
    args = dict(a.split("=", 1) for a in instr(SERVE_DOCKERFILE, "ARG"))
    assert re.fullmatch(r"python:3\.1\d-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    user = instr(SERVE_DOCKERFILE, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert HEALTHCHECK_IN_IMAGE in instr(SERVE_DOCKERFILE, "HEALTHCHECK")[0]
    for copy in instr(SERVE_DOCKERFILE, "COPY"):
        if copy.startswith("--from="):
            continue
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository (the build context)"
    assert any(c.split()[0] == "deploy/healthcheck.py" and c.split()[1] == HEALTHCHECK_IN_IMAGE
               for c in instr(SERVE_DOCKERFILE, "COPY"))
    argv = exec_form(instr(SERVE_DOCKERFILE, "ENTRYPOINT")[-1]) + exec_form(instr(SERVE_DOCKERFILE, "CMD")[-1])
    assert argv[0] == "edgeexit"
    parsed = serve_args(argv[1:])
    exposed = {int(p) for e in instr(SERVE_DOCKERFILE, "EXPOSE") for p in e.split()}
    assert {parsed.port, parsed.metrics_port} <= exposed and parsed.host == "0.0.0.0"
    # The HEALTHCHECK's default address (EDGEEXIT_HEALTH_ADDRESS) is the port CMD serves on.
    assert f"EDGEEXIT_HEALTH_ADDRESS=127.0.0.1:{parsed.port}" in " ".join(instr(SERVE_DOCKERFILE, "ENV"))


def test_serve_image_installs_the_pinned_base_without_torch():
    run = " ".join(instr(SERVE_DOCKERFILE, "RUN"))
    install = re.search(r"pip install (.*?)(&&|$)", run).group(1).split()
    assert "-c" in install and install[install.index("-c") + 1] == "constraints.txt"
    assert install[-1].strip("'\"") == ".[serve]", f"the serve extra only (export would bring torch): {install}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    constraints = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    lowered = {k.lower().replace("_", "-"): v for k, v in constraints.items()}
    for dep in project["dependencies"] + project["optional-dependencies"]["serve"]:
        name, version = dep.split("==")
        assert not name.startswith("torch"), "the base install must stay torch-free"
        assert lowered.get(name.lower()) == version, f"{dep} disagrees with constraints.txt: pip would refuse"


def test_triton_image_is_pinned_non_root_and_copies_the_generated_repository(request, tmp_path):
    (base,) = instr(TRITON_DOCKERFILE, "FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), f"pin a release tag: {base}"
    assert instr(TRITON_DOCKERFILE, "USER")[-1] not in ("root", "0")
    assert instr(TRITON_DOCKERFILE, "HEALTHCHECK")
    cmd = exec_form(instr(TRITON_DOCKERFILE, "CMD")[-1])
    (copy,) = instr(TRITON_DOCKERFILE, "COPY")
    src, dest = copy.split()
    assert cmd[0] == "tritonserver" and f"--model-repository={dest.rstrip('/')}" in cmd
    # The documented build writes the repository where the COPY expects it: <context>/<src>.
    text = re.sub(r"\\\n#?", " ", TRITON_DOCKERFILE.read_text())
    out = Path(re.search(r"edgeexit triton-repo \S+ --out (\S+)", text).group(1))
    context_dir = re.search(r"docker build -f deploy/triton\.Dockerfile .* (\S+)\n", text).group(1)
    assert out.name == src.rstrip("/") and str(out.parent) == context_dir
    if help_text("triton-repo") is None:
        pytest.skip("`edgeexit triton-repo` does not exist yet: the COPY'd repository was not generated")
    from edgeexit.cli import main

    context = tmp_path / "context"
    bundle = request.getfixturevalue("tiny_bundle")
    assert main(["triton-repo", str(bundle), "--out", str(context / src.rstrip("/")), "--flavour", "onnx",
                 "--encoding", "int8"]) == 0
    repo = context / src
    assert repo.is_dir() and any(repo.glob("*/config.pbtxt")), f"COPY {src}: triton-repo wrote no models there"


# --- flags in every recipe ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["serve", "agent", "triton-repo", "triton"])
def test_every_flag_a_recipe_names_exists(sub: str):
    referenced = flags_referenced(sub)
    if not referenced:
        assert sub != "serve", "the recipes must show `edgeexit serve` command lines"
        pytest.skip(f"no recipe references `edgeexit {sub}` with flags")
    text = help_text(sub)
    if text is None:
        pytest.skip(f"`edgeexit {sub}` does not exist yet (being written): its flags were not checked")
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    unknown = {f"{name}: {flag}" for name, flags in referenced.items() for flag in flags - known}
    assert not unknown, f"flags that `edgeexit {sub} --help` does not list: {sorted(unknown)}"


def test_flag_scan_sees_recipe_flags_and_would_catch_a_wrong_one():
    # The scan above must find the serve flags the README and Dockerfile comments show, or it proves nothing.
    assert "--tls-cert" in set().union(*flags_referenced("serve").values())
    assert "--no-such-flag" not in (help_text("serve") or "")
    assert help_text("no-such-command") is None


# --- the probe script against a real serve ------------------------------------------------------------------

def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeexit_deploy_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_answers_against_a_real_serve_plain_tls_and_down(serve, pki, tmp_path, capsys):
    hc = _healthcheck()
    plain = serve(ServerOptions(token="s3cret"))  # health needs no token
    assert hc.main(["--address", f"127.0.0.1:{plain.port}"]) == 0
    assert "SERVING" in capsys.readouterr().out

    tls = serve(ServerOptions(tls_cert=pki["server_cert"], tls_key=pki["server_key"]))
    address = f"127.0.0.1:{tls.port}"
    assert hc.main(["--address", address, "--tls-ca", pki["ca"]]) == 0
    assert hc.main(["--address", address, "--timeout", "1"]) == 1  # plaintext against TLS: what a grpc: probe sees
    assert hc.main(["--address", address, "--tls-ca", pki["rogue_ca"], "--timeout", "1"]) == 1
    assert hc.main(["--address", address, "--tls-cert", pki["client_cert"]]) == 1  # TLS options need --tls-ca
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "need --tls-ca" in err

    # As the container runs it: a separate process configured by EDGEEXIT_HEALTH_* environment variables.
    env = {**os.environ, "EDGEEXIT_HEALTH_ADDRESS": address, "EDGEEXIT_HEALTH_TLS_CA": pki["ca"],
           "EDGEEXIT_HEALTH_SERVER_NAME": "localhost"}
    res = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "SERVING" in res.stdout, res.stderr

    tls.health.enter_graceful_shutdown()  # what SIGTERM does first: readiness must fail during the drain
    assert hc.main(["--address", address, "--tls-ca", pki["ca"]]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on: the probe fails within its timeout, no hang
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    assert hc.main(["--address", f"127.0.0.1:{dead}", "--timeout", "1"]) == 1
