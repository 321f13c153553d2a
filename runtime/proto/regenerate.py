"""Regenerate the committed Python stubs from ``proto/*.proto`` with the pinned grpcio-tools.

The base install has no grpcio-tools, so the stubs are committed; a test regenerates them into a temporary
directory and checks they are identical. Run ``python -m edgeexit.runtime.proto.regenerate`` after editing
a ``.proto`` file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from edgeexit.errors import ConfigError

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
STUB_DIR = Path(__file__).resolve().parent
PACKAGE = "edgeexit.runtime.proto"
PROTOS = ("grpc_service.proto",)


# Our messages live in a private descriptor pool: tritonclient registers the same `inference.*` symbols in
# the default pool, and an app that imports both (e.g. a test, or an app calling the agent with
# tritonclient) would otherwise fail with "duplicate file name grpc_service.proto".
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "POOL.AddSerializedFile("
_POOL_DECL = (
    "# edgeexit: a private pool, so tritonclient's copy of these symbols can coexist.\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
)


def _post_process(text: str) -> str:
    # protoc writes `import grpc_service_pb2 as ...`, which only works with the stub dir on sys.path.
    text = re.sub(r"^import (\w+_pb2) as ", rf"from {PACKAGE} import \1 as ", text, flags=re.M)
    if _DEFAULT_POOL in text:
        text = text.replace("DESCRIPTOR = " + _DEFAULT_POOL, _POOL_DECL + "DESCRIPTOR = " + _PRIVATE_POOL)
    return text


def generate(out_dir: Path = STUB_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Write ``*_pb2.py`` and ``*_pb2_grpc.py`` for every proto into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise ConfigError("regenerating stubs needs grpcio-tools: pip install -e '.[dev]'") from e
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in PROTOS:
        args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}", str(Path(proto_dir) / name)]
        if protoc.main(args) != 0:
            raise ConfigError(f"protoc failed on {proto_dir / name}; see the message above")
        stem = name.removesuffix(".proto")
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            path = out_dir / f"{stem}{suffix}"
            path.write_text(_post_process(path.read_text()))
            written.append(path)
    return written


if __name__ == "__main__":
    for p in generate():
        print(p)
    sys.exit(0)
