"""A Triton model repository from a bundle: one model per tail ``<model>@<s>`` and one for the whole model
``<model>``, with the names, inputs and outputs of ``edgeexit serve``, so an agent cannot tell them apart.

Two flavours:

- ``python``: Triton's Python backend runs ``triton_python/model.py`` (shipped beside this module), which
  decodes the wire with edgeexit's own codec and runs the segments with onnxruntime. Runs on the CPU Triton
  that ``make setup`` installs (``edgeexit triton REPO``).
- ``onnx``: the ``onnxruntime_onnx`` platform runs the tail as one ONNX model (``exporters/triton_onnx.py``:
  a DequantizeLinear prologue for INT8), for a full Triton with GPUs.

Triton admits one datatype per input and checks a request's byte count against its shape before a model sees
it: so each boundary's wire encoding is fixed when the repository is written (it must match the agents'
``--encoding``), and zstd-compressed tensors (``--compress``) cannot reach either flavour. The README written
at the repository's top says so, model by model.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgeexit.bundle import BATCH, MANIFEST, Bundle, TensorSpec
from edgeexit.errors import ConfigError
from edgeexit.runtime import codec

FLAVOURS = ("python", "onnx")
VERSION = "1"  # the model version directory (issue 12 §4 will name the bundle's digest)
TEMPLATE = Path(__file__).parent / "triton_python" / "model.py"
# Wire encoding (agent --encoding, or the whole model's raw input) -> Triton config datatype.
CONFIG_TYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}
RAW_INPUTS = ("uint8", "fp32", "fp16")


@dataclass
class RepoOptions:
    flavour: str = "python"
    # Boundary wire encoding: one for every split point, or split index -> encoding. Match the agents' --encoding.
    encoding: str | Mapping[int, str] = "fp32"
    # What the whole model <model> takes: uint8 (what agents send for 8-bit pixels: --split cloud, probes) or
    # fp32/fp16 (what agents send for pixels off the k/255 grid, and what plain clients send).
    raw_input: str = "uint8"
    max_batch_size: int = 64  # rows; a request with more rows is refused by Triton
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 16])
    max_queue_delay_us: int = 2000  # like `edgeexit serve --max-batch-delay-ms 2`
    instances: int = 1  # model instances (processes for the python flavour)
    threads: int = 1  # onnxruntime intra-op threads per segment session (python flavour)
    python_env: Path | None = None  # written as EXECUTION_ENV_PATH; None: `edgeexit triton` puts it on PATH

    def check(self, num_splits: int) -> None:
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"unknown Triton repository flavour {self.flavour!r}; choose one of {FLAVOURS}")
        if self.raw_input not in RAW_INPUTS:
            raise ConfigError(f"--raw-input must be one of {RAW_INPUTS}, not {self.raw_input!r}")
        for s in range(num_splits):
            if self.encoding_of(s) not in codec.ENCODINGS:
                raise ConfigError(f"wire encoding {self.encoding_of(s)!r} for split {s}: choose one of "
                                  f"{codec.ENCODINGS}")
        if isinstance(self.encoding, Mapping) and not set(self.encoding) <= set(range(num_splits)):
            raise ConfigError(f"encodings given for split points {sorted(self.encoding)}; the bundle has "
                              f"0..{num_splits - 1}")
        if self.max_batch_size < 1 or self.instances < 1 or self.threads < 1 or self.max_queue_delay_us < 0:
            raise ConfigError("--max-batch-size, --instances and --threads must be positive, the queue delay >= 0")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"preferred batch sizes {bad} are outside 1..--max-batch-size ({self.max_batch_size})")

    def encoding_of(self, split: int) -> str:
        if isinstance(self.encoding, Mapping):
            return self.encoding.get(split, "fp32")
        return self.encoding


@dataclass
class RepoModel:
    """What the repository's README says about one model."""

    name: str
    input: str
    datatype: str  # the wire datatype Triton admits (FP32, INT8, ...)
    outputs: list[str]


def _dims(spec: TensorSpec) -> list[int]:
    """A tensor's config dims: the batch axis dropped (max_batch_size > 0), other symbolic axes as -1."""
    return [-1 if not isinstance(d, int) else d for d in spec.shape if d != BATCH]


def _tensor(name: str, data_type: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }}'


def config_pbtxt(name: str, inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]],
                 options: RepoOptions, parameters: Mapping[str, str] | None = None) -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format, as Triton reads it)."""
    o = options
    lines = [f'name: "{name}"',
             'backend: "python"' if o.flavour == "python" else 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {o.max_batch_size}",
             "input [", ",\n".join(_tensor(*t) for t in inputs), "]",
             "output [", ",\n".join(_tensor(*t) for t in outputs), "]"]
    preferred = f"preferred_batch_size: [ {', '.join(map(str, o.preferred_batch_sizes))} ] " \
        if o.preferred_batch_sizes else ""
    lines.append(f"dynamic_batching {{ {preferred}max_queue_delay_microseconds: {o.max_queue_delay_us} }}")
    lines.append(f"instance_group [ {{ count: {o.instances} kind: KIND_CPU }} ]")
    lines.append(f"version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}")
    params = dict(parameters or {})
    if o.flavour == "python" and o.python_env is not None:
        params["EXECUTION_ENV_PATH"] = str(Path(o.python_env).absolute())
    if params:
        lines.append("parameters [")
        lines.append(",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()))
        lines.append("]")
    return "\n".join(lines) + "\n"


def _copy_segments(bundle: Bundle, start: int, dest: Path) -> None:
    """The manifest and the onnx files of segments ``start..`` (all this model runs), as the bundle lays them."""
    dest.mkdir(parents=True)
    shutil.copy2(bundle.root / MANIFEST, dest / MANIFEST)
    for seg in bundle.manifest.segments[start:]:
        rel = seg.files["onnx"].path
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.root / rel, dest / rel)


def _write_model(bundle: Bundle, start: int, out: Path, options: RepoOptions) -> RepoModel:
    m = bundle.manifest
    name = m.name if start == 0 else f"{m.name}@{start - 1}"
    spec = m.input if start == 0 else m.split_points[start - 1].tensor
    wire = options.raw_input if start == 0 else options.encoding_of(start - 1)
    model_dir = out / name
    version = model_dir / VERSION
    specs = {t.name: t for seg in m.segments for t in seg.outputs}
    exits = [f"exit{j}" for seg in m.segments[start:] for j in seg.exits]
    outputs = [(e, "TYPE_FP32", _dims(specs[e])) for e in exits]
    if options.flavour == "python":
        _copy_segments(bundle, start, version / "bundle")
        shutil.copy2(TEMPLATE, version / "model.py")
        inputs = [(spec.name, CONFIG_TYPES[wire], _dims(spec))]
        params = {"edgeexit.start": str(start), "edgeexit.threads": str(options.threads)}
    else:
        inputs, outputs, params = _onnx_model(bundle, start, wire, version)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs, options, params))
    return RepoModel(name, spec.name, inputs[0][1].removeprefix("TYPE_"), exits)


def _onnx_model(bundle: Bundle, start: int, wire: str, version: Path,
                ) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]], dict[str, str]]:
    """The onnx flavour's ``model.onnx`` (``exporters/triton_onnx.py``) and its config inputs and outputs."""
    from edgeexit.exporters.triton_onnx import write_onnx_tail  # imports onnx: only for this flavour

    spec = write_onnx_tail(bundle, start, wire, version / "model.onnx")
    inputs = [(spec.input.name, spec.input.triton_type, list(spec.input.dims))]
    return inputs, [(t.name, t.triton_type, list(t.dims)) for t in spec.outputs], {}


def write_repository(bundle: Bundle | str | Path, out: str | Path, options: RepoOptions | None = None,
                     force: bool = False) -> list[RepoModel]:
    """Write the repository to ``out`` (replaced only with ``force``); returns its models, whole model first."""
    options = options or RepoOptions()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    m = bundle.manifest
    options.check(len(m.split_points))
    if options.flavour == "python" and "onnx" not in bundle.formats:
        raise ConfigError(f"{bundle.root} has no onnx segments (has {bundle.formats}); the python flavour runs "
                          "them with onnxruntime: export with `--formats onnx`")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it or choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        models = [_write_model(bundle, start, tmp, options) for start in range(len(m.segments))]
        (tmp / "README.md").write_text(readme(m.name, models, options))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return models


def readme(bundle_name: str, models: list[RepoModel], options: RepoOptions) -> str:
    rows = "\n".join(f"| `{r.name}` | `{r.input}` | {r.datatype} | {', '.join(r.outputs)} |" for r in models)
    return f"""# Triton model repository for `{bundle_name}` ({options.flavour} flavour)

Written by `edgeexit triton-repo`. Serve it with `edgeexit triton REPO` (the CPU Triton that `make setup`
installs) or any Triton 2.51+ (`tritonserver --model-repository REPO`). Each model has the name, input and
outputs of `edgeexit serve`; an edgeexit agent offloads to it with `--cloud HOST:GRPC_PORT`, unmodified.

| model | input | datatype Triton admits | outputs (FP32 logits) |
|---|---|---|---|
{rows}

Batching: `max_batch_size` {options.max_batch_size} rows (a request with more rows is refused), dynamic batching
with preferred sizes {options.preferred_batch_sizes or "none"} and a {options.max_queue_delay_us} us queue delay,
{options.instances} instance(s) on the CPU. Version directory `{VERSION}`.

## What each flavour supports
| wire | python (Python backend + onnxruntime) | onnx (`onnxruntime_onnx` platform, GPUs) |
|---|---|---|
| FP32, FP16 boundaries | yes (the one written here) | yes (the one written here) |
| INT8 boundaries | yes: reads `edgeexit.scale` / `edgeexit.zero_point` | yes: the bundle's calibrated values |
| raw pixels to `<model>` | UINT8 (k means k/255), FP32 or FP16 | UINT8, FP32 or FP16 |
| zstd (`agent --compress`) | **no** (see below) | **no** (see below; nor could ONNX decompress) |
| `edgeexit.queue_us` / `compute_us` | no: its Python backend cannot set response parameters | no |

- **One datatype per model.** Triton admits only the datatype in `config.pbtxt`: agents must use the
  `--encoding` each tail was written with (table above); any other is refused with INVALID_ARGUMENT.
  Regenerate with `edgeexit triton-repo --encoding ...` to change it.
- **zstd is not possible with either flavour**: Triton checks that a request's byte count matches its shape
  and datatype before any model sees it, so a compressed tensor is refused (INVALID_ARGUMENT, "input byte size
  mismatch"). Agents offloading to Triton must run without `--compress`; `edgeexit serve` accepts zstd.
- The python flavour's models need a Python environment with numpy<2 (numpy 2 makes every response silently
  empty), onnxruntime, zstandard and edgeexit (`--no-deps`); `edgeexit triton --python-env DIR` names it.
"""
