"""Convert one torch segment to TFLite (litert-torch, no TensorFlow) and its quantised variants
(ai-edge-quantizer): fp32, fp16 weights, dynamic-range int8, and static int8 calibrated on real inputs.

The TFLite signature uses the ONNX segment's names (``input`` / ``boundary{k}`` / ``exit{j}``) when the caller
passes them, and the manifest entry's ``extra`` records the signature key of every ONNX name in ONNX output
order, so the runtime never guesses (TFLite signatures sort outputs by name, and ``exit10`` < ``exit2``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.errors import ConfigError, ExportError, ToleranceError

SIGNATURE = "serving_default"
CALIBRATION_BATCH = 32
MAX_BATCH = 4096  # upper bound torch.export needs for the symbolic batch axis


@dataclass(frozen=True)
class Variant:
    suffix: str  # file name: <stem><suffix>
    recipe: str  # what ai-edge-quantizer applies ("" = plain conversion)
    about: str


# One table of the TFLite formats a bundle can carry (manifest format key -> how it is made).
VARIANTS: dict[str, Variant] = {
    "tflite": Variant(".tflite", "", "fp32 weights and activations"),
    "tflite-fp16": Variant(".fp16.tflite", "weight_only_fp16", "fp16 weights, fp32 compute and I/O"),
    "tflite-int8-dynamic": Variant(".int8-dynamic.tflite", "dynamic_wi8_afp32",
                                   "int8 per-channel weights, activations quantised at run time, fp32 I/O"),
    "tflite-int8-static": Variant(".int8-static.tflite", "static_wi8_ai8",
                                  "int8 weights and activations calibrated on real data, int8 I/O"),
}


@dataclass(frozen=True)
class SegmentNames:
    """The ONNX segment's tensor names: one input, outputs in ONNX order (boundary first, then exits)."""

    input: str
    outputs: tuple[str, ...]


class _NamedIO(torch.nn.Module):
    """Gives the TFLite signature the segment's names: an input named like the ONNX input and a dict of outputs.
    Build it with :func:`named_io`, which gives ``forward`` a parameter called ``names.input``."""

    def __init__(self, module: torch.nn.Module, names: SegmentNames):
        super().__init__()
        self.module = module
        self.names = names

    def named(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = self.module(x)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return dict(zip(self.names.outputs, outs, strict=True))


def named_io(module: torch.nn.Module, names: SegmentNames) -> _NamedIO:
    """Wrap ``module`` so torch.export (hence the TFLite signature) sees one input called ``names.input``.

    torch.export names inputs after ``forward``'s parameters; ``**kwargs`` would show up as one nested input,
    so each wrapper class carries an explicit signature instead of generated code."""
    if not names.input.isidentifier():
        raise ConfigError(f"tensor name {names.input!r} is not usable as a TFLite signature name")

    def forward(self: _NamedIO, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.named(kwargs[names.input] if kwargs else args[0])

    param = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [param("self", param.POSITIONAL_OR_KEYWORD), param(names.input, param.POSITIONAL_OR_KEYWORD)])
    cls = type(f"NamedIO_{names.input}", (_NamedIO,), {"forward": forward})
    return cls(module, names).eval()


def export_tflite_segment(module: torch.nn.Module, sample: torch.Tensor, out_dir: Path, stem: str,
                          variants: Sequence[str], calibration: np.ndarray | None = None,
                          names: SegmentNames | None = None) -> dict[str, dict]:
    """Write ``out_dir/<stem><suffix>`` for every variant; return ``{variant: {"file", "batch", "extra"}}``.

    ``calibration`` holds real inputs of THIS segment (needed by ``tflite-int8-static``); ``names`` the ONNX
    names (without them the signature keeps generic names and ``extra`` still records the output order).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown TFLite variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "tflite-int8-static" in variants and (calibration is None or len(calibration) == 0):
        raise ConfigError("static int8 TFLite needs real calibration inputs: pass --calibration-data "
                          "(or drop int8-static from --quantize)")
    module = module.eval()
    names = names or _generic_names(module, sample)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    converted = convert_float(module, sample, names)
    float_model, batch = converted.data, converted.batch
    calib_batch = CALIBRATION_BATCH if batch == "dynamic" else int(batch.split(":")[1])
    results: dict[str, dict] = {}
    for variant in variants:
        spec = VARIANTS[variant]
        data, quant = (float_model, {}) if not spec.recipe else quantize(
            float_model, variant, QuantInputs(calibration, names, calib_batch))
        filename = stem + spec.suffix
        (out_dir / filename).write_bytes(data)
        extra = {"signature": SIGNATURE, "input": names.input, "outputs": list(names.outputs),
                 "variant": spec.about, **io_quantization(data), **quant}
        # fp32 was checked against torch; a quantised fixed-batch variant must resize as faithfully as it loops.
        extra["resizable"] = converted.resizable if variant == "tflite" or batch == "dynamic" else (
            converted.resizable and resize_matches_loop(out_dir / filename, extra, _probe(sample).numpy()))
        results[variant] = {"file": filename, "batch": batch, "extra": extra}
    return results


def resize_matches_loop(path: Path, extra: dict[str, Any], x: np.ndarray) -> bool:
    """True when one resized invoke on ``x`` gives what invoking sample by sample gives (same model file)."""
    from edgeexit.runtime.litert_backend import LiteRTSession

    feeds = {extra["input"]: x}
    try:
        resized = LiteRTSession(path, extra={**extra, "resizable": True}).run(feeds)
    except (RuntimeError, ValueError):
        return False
    looped = LiteRTSession(path, extra={**extra, "resizable": False}).run(feeds)
    step = max([q["scale"] for q in extra.get("io_quantization", {}).values()], default=0.0)
    return all(a.shape == b.shape and np.abs(a - b).max() <= 1e-4 + 1e-3 * np.abs(b).max() + step
               for a, b in zip(resized, looped, strict=True))


def _generic_names(module: torch.nn.Module, sample: torch.Tensor) -> SegmentNames:
    with torch.no_grad():
        outs = module(sample)
    count = len(outs) if isinstance(outs, (tuple, list)) else 1
    return SegmentNames("input", tuple(f"output_{i}" for i in range(count)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """litert-torch prints a progress tree to stdout; an export CLI should not."""
    import litert_torch

    before = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    litert_torch.config.show_progress = False
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = before


@dataclass(frozen=True)
class FloatModel:
    data: bytes
    batch: str  # "dynamic" or "fixed:<n>" (the manifest's batch contract)
    resizable: bool  # a fixed-batch model that still answers correctly after resize_tensor_input


def convert_float(module: torch.nn.Module, sample: torch.Tensor, names: SegmentNames) -> FloatModel:
    """The fp32 TFLite model, checked against torch on a batch of 3 (a size no trace used).

    ``dynamic`` when the converter keeps a symbolic batch axis that gives right answers at other batches;
    otherwise a fixed-batch model (``fixed:1``, or the sample's batch if the segment has it baked in), marked
    ``resizable`` when resize_tensor_input still gives right answers (else the runtime loops)."""
    wrapped = named_io(module, names)
    probe = _probe(sample)
    with torch.no_grad():
        want = [o.numpy() for o in wrapped(probe).values()]
    dynamic_error: Exception | None = None
    with _quiet():
        try:
            data = _convert(wrapped, sample, names, dynamic=True)
            if _batch_axis(data) == -1 and _agrees(data, probe, want, names):
                return FloatModel(data, "dynamic", True)
            dynamic_error = ExportError("the dynamic-batch model disagrees with torch at batch 3")
        except Exception as e:  # the converter raises many types; fall back to a fixed batch, stated below
            dynamic_error = e
        # litert-torch lowers some ops (e.g. elementwise or mean right on the input) through a JAX bridge that
        # rejects a symbolic batch; batch 1 first (any batch then works by resizing or looping).
        for fixed in dict.fromkeys([1, int(sample.shape[0])]):
            try:
                data = _convert(wrapped, sample[:fixed].contiguous(), names, dynamic=False)
                break
            except Exception as e:
                error = e
        else:
            raise ExportError(f"litert-torch cannot convert this segment ({type(error).__name__}: {error}); "
                              "export without --formats tflite, or simplify the segment's ops") from error
    rows = probe[:1] if fixed == 1 else sample[:fixed].float()
    with torch.no_grad():
        want_rows = [o.numpy() for o in wrapped(rows).values()]
    if not _agrees(data, rows, want_rows, names, resize=False):
        raise ToleranceError(f"the TFLite conversion of segment input {names.input!r} disagrees with torch; "
                             "export without --formats tflite and report the model")
    logging.getLogger(__name__).info("dynamic batch unavailable (%s); wrote a batch-%d TFLite model",
                                     str(dynamic_error).splitlines()[0] if str(dynamic_error) else dynamic_error,
                                     fixed)
    return FloatModel(data, f"fixed:{fixed}", fixed == 1 and _agrees(data, probe, want, names))


def _convert(wrapped: torch.nn.Module, sample: torch.Tensor, names: SegmentNames, dynamic: bool) -> bytes:
    import litert_torch

    if not dynamic:
        return bytes(litert_torch.convert(wrapped, (), {names.input: sample}).model_content())
    batch_dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # torch.export specialises a batch of 1; trace with 2 so the axis stays symbolic.
    two = sample[:1].expand(2, *sample.shape[1:]).contiguous() if sample.shape[0] < 2 else sample
    model = litert_torch.convert(wrapped, (), {names.input: two}, dynamic_shapes={names.input: {0: batch_dim}})
    return bytes(model.model_content())


def _probe(sample: torch.Tensor) -> torch.Tensor:
    """Three distinct rows shaped like the sample: a batch that no trace used, to catch baked-in batch sizes."""
    gen = torch.Generator().manual_seed(0)
    base = sample[:1].float()
    noise = torch.randn((3, *sample.shape[1:]), generator=gen) * (base.std() + 1e-3)
    return (base + noise).contiguous()


def _agrees(data: bytes, x: torch.Tensor, want: list[np.ndarray], names: SegmentNames,
            resize: bool = True) -> bool:
    """Run the model on ``x`` (resizing its input to x's batch) and compare every output with torch's."""
    interp = _interpreter(data)
    try:
        runner = interp.get_signature_runner(SIGNATURE) if resize else _FixedRunner(interp)
        got = runner(**{names.input: x.numpy()})
    except (RuntimeError, ValueError):
        return False
    for name, ref in zip(names.outputs, want, strict=True):
        out = got.get(name)
        if out is None or out.shape != ref.shape:
            return False
        if np.abs(out - ref).max() > 1e-4 + 1e-3 * np.abs(ref).max():
            return False
    return True


class _FixedRunner:
    """Invoke a single-signature model at its own input shape (no resize), returning outputs by name."""

    def __init__(self, interp):
        self.interp = interp
        interp.allocate_tensors()  # before any tensor access: reallocating later would invalidate views
        runner = interp.get_signature_runner(SIGNATURE)
        self.inputs = {k: d["index"] for k, d in runner.get_input_details().items()}
        self.outputs = {k: d["index"] for k, d in runner.get_output_details().items()}

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        for key, x in feeds.items():
            self.interp.set_tensor(self.inputs[key], x)
        self.interp.invoke()
        return {k: self.interp.get_tensor(i) for k, i in self.outputs.items()}


def _interpreter(data: bytes):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=data, num_threads=1)


def _batch_axis(data: bytes) -> int:
    return int(_interpreter(data).get_input_details()[0]["shape_signature"][0])


@dataclass(frozen=True)
class QuantInputs:
    """What a quantisation recipe may need besides the float model."""

    calibration: np.ndarray | None  # real inputs of this segment (static int8 only)
    names: SegmentNames
    batch: int  # calibration batch: the model's own for fixed-batch models (XNNPACK cannot resize them)


def quantize(float_model: bytes, variant: str, inputs: QuantInputs) -> tuple[bytes, dict[str, Any]]:
    """Apply the variant's ai-edge-quantizer recipe; return the model and facts for the manifest."""
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName

    spec = VARIANTS[variant]
    q = quantizer.Quantizer(bytearray(float_model))
    facts: dict[str, Any] = {"quantizer": "ai-edge-quantizer", "recipe": spec.recipe}
    if variant == "tflite-fp16":
        # ai-edge-quantizer's fp16 path: weight-only FLOAT_CASTING to 16 bits (weights stored fp16,
        # dequantised to fp32 once at load by the runtime).
        q.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
    else:
        q.load_quantization_recipe(getattr(recipe, spec.recipe)())
    calib = None
    if q.need_calibration:
        batches = calibration_batches(inputs.calibration, inputs.names.input, inputs.batch)
        calib = q.calibrate({SIGNATURE: batches}, num_threads=1)
        facts["calibration_samples"] = int(len(inputs.calibration))
    try:
        result = q.quantize(calib, enable_progress_report=False)
    except Exception as e:  # the quantizer raises plain ValueError/RuntimeError
        raise ExportError(f"ai-edge-quantizer failed on {variant} ({e}); drop it from --quantize") from e
    return bytes(result.quantized_model), facts


def calibration_batches(calibration: np.ndarray | None, input_name: str,
                        batch: int = CALIBRATION_BATCH) -> list[dict[str, np.ndarray]]:
    """Split real samples into equal batches the calibrator feeds through the float model (the tail is topped up
    with the first samples again, so a fixed-batch model gets full batches)."""
    if calibration is None or len(calibration) == 0:
        raise ConfigError("static int8 needs calibration inputs; pass --calibration-data")
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    count = -(-len(data) // batch) * batch
    data = np.resize(data, (count, *data.shape[1:]))  # np.resize repeats from the start
    return [{input_name: data[i:i + batch]} for i in range(0, count, batch)]


def io_quantization(data: bytes) -> dict[str, Any]:
    """Per-tensor scale/zero-point of int8 inputs and outputs, keyed by signature name (empty for float I/O)."""
    interp = _interpreter(data)
    runner = interp.get_signature_runner(SIGNATURE)
    found: dict[str, Any] = {}
    details = {**runner.get_input_details(), **runner.get_output_details()}
    for key, d in details.items():
        if np.dtype(d["dtype"]) in (np.int8, np.uint8):
            scale, zero = d["quantization"]
            found[key] = {"dtype": np.dtype(d["dtype"]).name, "scale": float(scale), "zero_point": int(zero)}
    return {"io_quantization": found} if found else {}

