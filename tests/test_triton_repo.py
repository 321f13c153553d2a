"""`edgeexit triton-repo`: the repository's layout, each config.pbtxt parsed with Triton's own ModelConfig schema
(tritonclient ships it), per-split encodings, the README, --force, and the launcher's checks (fast: no server;
tests/test_triton_server.py runs the real one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from edgeexit.bundle import Bundle
from edgeexit.cli import main
from edgeexit.errors import ConfigError
from edgeexit.exporters.triton_repo import RepoOptions, write_repository
from edgeexit.triton_server import TritonOptions, TritonServer, check_python_env, find_python_env


def config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def test_python_flavour_writes_every_model_as_serve_names_it(tiny_bundle, tmp_path):
    m = Bundle.load(tiny_bundle).manifest
    opts = RepoOptions(encoding={0: "int8"}, raw_input="uint8", max_batch_size=32, preferred_batch_sizes=[4, 8],
                       max_queue_delay_us=500, instances=2)
    models = write_repository(tiny_bundle, tmp_path / "repo", opts)
    repo = tmp_path / "repo"
    names = [m.name, *(f"{m.name}@{s}" for s in range(len(m.split_points)))]
    assert [r.name for r in models] == names
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(names)
    types = {}
    for start, name in enumerate(names):
        c = config(repo, name)
        assert c.name == name and c.backend == "python" and c.max_batch_size == 32
        assert list(c.dynamic_batching.preferred_batch_size) == [4, 8]
        assert c.dynamic_batching.max_queue_delay_microseconds == 500
        assert c.instance_group[0].count == 2 and c.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert list(c.version_policy.specific.versions) == [1]
        assert c.parameters["edgeexit.start"].string_value == str(start)
        spec = m.input if start == 0 else m.split_points[start - 1].tensor
        assert [i.name for i in c.input] == [spec.name] and list(c.input[0].dims) == [int(d) for d in spec.shape[1:]]
        exits = [f"exit{j}" for seg in m.segments[start:] for j in seg.exits]
        assert [o.name for o in c.output] == exits
        assert all(o.data_type == mc.TYPE_FP32 and list(o.dims) == [10] for o in c.output)
        types[name] = c.input[0].data_type
        # The model file and only the segments it runs, with the manifest that checks them.
        version = repo / name / "1"
        assert (version / "model.py").read_text().startswith('"""Triton Python-backend model')
        copied = sorted(p.name for p in (version / "bundle" / "segments").iterdir())
        assert copied == sorted(Path(s.files["onnx"].path).name for s in m.segments[start:])
        assert json.loads((version / "bundle" / "manifest.json").read_text())["name"] == m.name
    # One datatype per input: the whole model's raw pixels, split 0 as asked, split 1 the default.
    assert types == {m.name: mc.TYPE_UINT8, f"{m.name}@0": mc.TYPE_INT8, f"{m.name}@1": mc.TYPE_FP32}
    readme = (repo / "README.md").read_text()
    assert "zstd" in readme and "**no**" in readme and f"`{m.name}@0` | `boundary0` | INT8" in readme


def test_python_env_goes_into_each_config_when_named(tiny_bundle, tmp_path):
    write_repository(tiny_bundle, tmp_path / "r", RepoOptions(python_env=tmp_path / "env"))
    name = Bundle.load(tiny_bundle).manifest.name
    assert config(tmp_path / "r", name).parameters["EXECUTION_ENV_PATH"].string_value == str(tmp_path / "env")


def test_onnx_flavour_config(tiny_bundle, tmp_path):
    write_repository(tiny_bundle, tmp_path / "r", RepoOptions(flavour="onnx", encoding="int8", raw_input="fp32"))
    name = Bundle.load(tiny_bundle).manifest.name
    c = config(tmp_path / "r", f"{name}@0")
    assert c.platform == "onnxruntime_onnx" and not c.backend and c.input[0].data_type == mc.TYPE_INT8
    assert (tmp_path / "r" / f"{name}@0" / "1" / "model.onnx").is_file()
    assert config(tmp_path / "r", name).input[0].data_type == mc.TYPE_FP32


def test_existing_out_needs_force_and_bad_options_say_what_to_do(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["triton-repo", str(tiny_bundle), "--out", str(out), "--encoding", "fp16"]) == 0
    assert "boundary0 FP16" in capsys.readouterr().out
    assert main(["triton-repo", str(tiny_bundle), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["triton-repo", str(tiny_bundle), "--out", str(out), "--force"]) == 0
    name = Bundle.load(tiny_bundle).manifest.name
    assert config(out, f"{name}@0").input[0].data_type == mc.TYPE_FP32  # replaced, not merged
    assert not out.with_name("r.tmp").exists()
    with pytest.raises(ConfigError, match="outside 1..--max-batch-size"):
        write_repository(tiny_bundle, tmp_path / "x", RepoOptions(max_batch_size=4, preferred_batch_sizes=[8]))
    with pytest.raises(ConfigError, match="split points \\[5\\]"):
        write_repository(tiny_bundle, tmp_path / "x", RepoOptions(encoding={5: "int8"}))
    assert not (tmp_path / "x").exists()


def test_launcher_refuses_what_cannot_serve(tmp_path):
    with pytest.raises(ConfigError, match="edgeexit triton-repo"):
        TritonServer(TritonOptions(tmp_path))  # not a repository we wrote
    with pytest.raises(ConfigError, match="--python-env"):
        find_python_env(tmp_path / "nothing")
    # The project's own venv has numpy 2: the models would answer with empty responses, so it is refused.
    with pytest.raises(ConfigError, match="numpy<2"):
        check_python_env(find_python_env(Path(__file__).resolve().parents[1] / ".venv"))
