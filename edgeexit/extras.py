"""Which pip extra installs which optional package, so a missing one is a ConfigError saying what to install.

The base install holds only numpy, grpcio and protobuf (what ``edgeexit.client`` and the CLI's parser need);
everything that runs a bundle comes from an extra (pyproject.toml, README "Install"). Imports nothing.
"""

from __future__ import annotations

from edgeexit.errors import ConfigError

# The base install's distributions (pyproject.toml `dependencies`).
BASE: frozenset[str] = frozenset({"numpy", "grpcio", "protobuf"})
# Top-level module -> the extra that brings it (the first one listed for a module that several extras carry).
MODULE_EXTRA: dict[str, str] = {
    "onnxruntime": "device",
    "grpc_health": "device",
    "zstandard": "device",
    "prometheus_client": "device",
    "tqdm": "device",
    "ai_edge_litert": "device-litert",
    "torch": "export",
    "onnx": "export",
    "onnxscript": "export",
    "litert_torch": "tflite-export",
    "ai_edge_quantizer": "tflite-export",
    "matplotlib": "plot",
    "mlxtend": "data",
    "sklearn": "data",
}
# Distribution names pip knows, where they differ from the module's.
DISTRIBUTION: dict[str, str] = {
    "grpc_health": "grpcio-health-checking", "prometheus_client": "prometheus-client",
    "ai_edge_litert": "ai-edge-litert", "litert_torch": "litert-torch", "ai_edge_quantizer": "ai-edge-quantizer",
    "sklearn": "scikit-learn",
}
# What a command's own extra is: suggested first when it carries the missing module.
COMMAND_EXTRA: dict[str, str] = {
    "serve": "serve", "agent": "device", "doctor": "device", "evaluate": "device", "calibrate": "device",
    "profile": "device", "plan": "device", "export": "export", "train": "export", "bottleneck": "export",
    "triton-repo": "triton",
    "triton": "triton",
}
# Modules each extra brings (mirrors pyproject.toml; tests/test_doctor.py checks the two agree).
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "client": frozenset(),
    "device": frozenset({"onnxruntime", "onnx", "grpc_health", "zstandard", "prometheus_client", "tqdm"}),
    "device-litert": frozenset({"ai_edge_litert", "grpc_health", "zstandard", "prometheus_client", "tqdm"}),
    "serve": frozenset({"onnxruntime", "onnx", "grpc_health", "zstandard", "prometheus_client", "tqdm"}),
    "gpu": frozenset({"onnxruntime", "grpc_health", "zstandard", "prometheus_client", "tqdm"}),
    "triton": frozenset({"onnxruntime", "onnx", "grpc_health", "zstandard", "prometheus_client", "tqdm"}),
    "export": frozenset({"torch", "onnx", "onnxscript", "onnxruntime", "grpc_health", "zstandard",
                         "prometheus_client", "tqdm"}),
    "tflite-export": frozenset({"litert_torch", "ai_edge_quantizer"}),
    "plot": frozenset({"matplotlib"}),
    "data": frozenset({"mlxtend", "sklearn"}),
}


def extra_for(module: str, command: str | None = None) -> str | None:
    """The extra to install for a missing ``module`` (top-level name), preferring ``command``'s own extra."""
    top = module.split(".")[0]
    own = COMMAND_EXTRA.get(command or "")
    if own and top in EXTRA_MODULES.get(own, frozenset()):
        return own
    return MODULE_EXTRA.get(top)


def missing_extra(exc: ModuleNotFoundError, command: str | None = None) -> ConfigError | None:
    """A ConfigError naming the extra that brings ``exc``'s module; None for a module no extra provides (a bug,
    which should keep its traceback)."""
    name = exc.name or ""
    extra = extra_for(name, command)
    if extra is None:
        return None
    who = f"edgeexit {command}" if command else "this"
    top = name.split(".")[0]
    return ConfigError(f"{who} needs the Python package {DISTRIBUTION.get(top, top)!r}, which this install lacks: "
                       f"install it with pip install \"edgeexit[{extra}]\" (README, \"Install\")")


def require(module: str, command: str | None = None) -> None:
    """Import ``module`` or raise the ConfigError naming its extra."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        err = missing_extra(e, command)
        if err is None:
            raise
        raise err from None
