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

GPUs: ``kind="gpu"`` (or ``gpus``) writes ``KIND_GPU`` instance groups; the onnx flavour then names the TensorRT
execution accelerator (``accelerator="tensorrt"``; Triton's onnxruntime backend puts CUDA behind it for a GPU
instance anyway), and the python flavour's models ask onnxruntime for TensorRT/CUDA on their instance's GPU,
falling back to the CPU with a warning in Triton's log.

Identity: Triton's version folders must be integers, so every model keeps version ``1`` and carries the bundle's
digest (``Bundle.digest``) as the config parameter ``edgeexit.bundle`` (Triton's ModelConfig RPC shows it) and in
the README. The python flavour's models refuse a request whose ``edgeexit.bundle`` parameter names another bundle;
the onnx flavour cannot see request parameters.
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
VERSION = "1"  # the model version directory: Triton wants an integer; the digest is a config parameter
P_BUNDLE = "edgeexit.bundle"  # as runtime/oip_messages.P_BUNDLE: the request parameter, and here the config's
KINDS = ("cpu", "gpu")
ACCELERATORS = {"tensorrt": "tensorrt,cuda,cpu", "cuda": "cuda,cpu"}  # -> the python flavour's providers
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
    kind: str = "cpu"  # instance kind: cpu | gpu (gpus given implies gpu)
    gpus: list[int] | None = None  # the GPUs each model's instances go on; None: every GPU (Triton's default)
    accelerator: str = "tensorrt"  # on GPUs: tensorrt (then CUDA, then CPU) or cuda (then CPU)

    @property
    def on_gpu(self) -> bool:
        return self.kind == "gpu" or bool(self.gpus)

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
        if self.kind not in KINDS or self.accelerator not in ACCELERATORS:
            raise ConfigError(f"--kind must be one of {KINDS} and --accelerator one of {tuple(ACCELERATORS)}")
        if self.gpus is not None and (not self.gpus or min(self.gpus) < 0 or len(set(self.gpus)) < len(self.gpus)):
            raise ConfigError(f"--gpus {self.gpus}: give distinct GPU indices >= 0, e.g. --gpus 0,1")
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
    digest: str  # the bundle's (config parameter edgeexit.bundle)


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
    gpus = f" gpus: [ {', '.join(map(str, o.gpus))} ]" if o.gpus else ""
    lines.append(f"instance_group [ {{ count: {o.instances} kind: KIND_{'GPU' if o.on_gpu else 'CPU'}{gpus} }} ]")
    lines.append(f"version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}")
    if o.flavour == "onnx" and o.on_gpu and o.accelerator == "tensorrt":
        # The onnxruntime backend tries these first on a GPU instance, then CUDA, then the CPU.
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" } ] } }')
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
    """One model's folder: its config.pbtxt (the bundle's digest as parameter ``edgeexit.bundle``) and files."""
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
        params = {"edgeexit.start": str(start), "edgeexit.threads": str(options.threads),
                  "edgeexit.providers": ACCELERATORS[options.accelerator] if options.on_gpu else "cpu"}
    else:
        inputs, outputs, params = _onnx_model(bundle, start, wire, version)
    params[P_BUNDLE] = bundle.digest
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs, options, params))
    return RepoModel(name, spec.name, inputs[0][1].removeprefix("TYPE_"), exits, bundle.digest)


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
        (tmp / "README.md").write_text(readme(m.name, models, options, bundle.digest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return models


def readme(bundle_name: str, models: list[RepoModel], options: RepoOptions, digest: str = "") -> str:
    o = options
    where = ("the CPU" if not o.on_gpu else f"GPU(s) {o.gpus}" if o.gpus else "every GPU")
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
{options.instances} instance(s) on {where} (`KIND_{'GPU' if o.on_gpu else 'CPU'}`). Version directory `{VERSION}`.
{_gpu_note(o)}
## Bundle identity
Bundle digest: `{digest}` (`edgeexit serve` prints the same at start for this bundle). Triton's version folders must
be integers, so every model is version `{VERSION}` (ModelMetadata `versions` says `1`, not the digest) and carries
the digest as its config parameter `{P_BUNDLE}` (Triton's ModelConfig RPC, e.g. `tritonclient ...
get_model_config(model)`, shows it). {_identity_note(o)}

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


def _gpu_note(o: RepoOptions) -> str:
    if not o.on_gpu:
        return ""
    if o.flavour == "onnx":
        how = ("the TensorRT execution accelerator first (its engines are built when a model loads, which can take "
               "minutes), then CUDA, then the CPU" if o.accelerator == "tensorrt" else "onnxruntime's CUDA provider")
        return f"\nOn GPUs the onnxruntime backend runs {how}. It needs a Triton with GPUs (e.g. NGC's image).\n"
    return (f"\nOn GPUs each python model asks onnxruntime for `{ACCELERATORS[o.accelerator]}` on its instance's GPU: "
            "the models' environment needs onnxruntime-gpu (see the edgeexit README, \"GPUs\"); without it they "
            "run on the CPU and say so in Triton's log. `KIND_GPU` needs a Triton that sees a GPU.\n")


def _identity_note(o: RepoOptions) -> str:
    if o.flavour == "python":
        return (f"A request whose `{P_BUNDLE}` parameter (a string, as the edgeexit agent sends) names another bundle "
                "is refused with Triton's UNSUPPORTED error, which clients see as gRPC UNIMPLEMENTED, and the message "
                "names the served digest's first 12 hex digits (Triton's Python backend has no FAILED_PRECONDITION, "
                "the code `edgeexit serve` gives). The edgeexit agent reads it as a bundle mismatch from the message, "
                "answers on the device and logs it; requests without the parameter are served.")
    return (f"**The onnx flavour cannot check it**: the onnxruntime backend never shows request parameters to the "
            f"model, so a request naming another bundle (`{P_BUNDLE}`) is answered, not refused. Roll the same "
            "bundle out to devices and this repository, or use the python flavour, which refuses a mismatch.")
