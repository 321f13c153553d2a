"""Run KServe's own gRPC client (kserve 0.21, unmodified) against a target, in a process of its own.

kserve's generated ``inference.*`` messages and tritonclient's share the default protobuf pool with different
files, so the two cannot be imported in one process; tests/test_kserve_client.py runs this as a subprocess.
Usage: ``python tests/kserve_probe.py SPEC.json OUT.npz``. SPEC: target, model, ready (model names to ask about),
metadata (a model name or null), infers (each: input name, datatype, npy path, params). OUT holds, per infer k,
``k/<output>`` arrays, and ``report`` (JSON: health, readiness, metadata, response parameters or the error).
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kpb


async def probe(spec: dict) -> tuple[dict, dict[str, np.ndarray]]:
    report: dict = {"infers": []}
    arrays: dict[str, np.ndarray] = {}
    async with InferenceGRPCClient(spec["target"], timeout=30) as client:
        report["live"] = await client.is_server_live()
        report["server_ready"] = await client.is_server_ready()
        report["ready"] = {m: await client.is_model_ready(m) for m in spec["ready"]}
        if spec.get("metadata"):
            meta = await client._client_stub.ModelMetadata(kpb.ModelMetadataRequest(name=spec["metadata"]))
            report["metadata"] = {"name": meta.name, "versions": list(meta.versions),
                                  "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
                                  "outputs": [t.name for t in meta.outputs]}
        for k, inf in enumerate(spec["infers"]):
            x = np.load(inf["npy"])
            inp = InferInput(inf["name"], list(x.shape), inf["datatype"])
            inp.set_data_from_numpy(x, binary_data=True)
            try:
                res = await client.infer(InferRequest(spec["model"], [inp], parameters=inf.get("params")))
            except Exception as e:  # noqa: BLE001 - reported to the test, which asserts on it
                report["infers"].append({"error": f"{type(e).__name__}: {e}"})
                continue
            report["infers"].append({"params": {key: _value(v) for key, v in (res.parameters or {}).items()}})
            for o in res.outputs:
                arrays[f"{k}/{o.name}"] = o.as_numpy()
    return report, arrays


def _value(v):
    """An InferParameter's one value (int64, string or bool: KServe's has no double)."""
    return getattr(v, v.WhichOneof("parameter_choice")) if isinstance(v, kpb.InferParameter) else v


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    report, arrays = asyncio.run(probe(spec))
    np.savez(sys.argv[2], report=np.array(json.dumps(report, default=str)), **arrays)


if __name__ == "__main__":
    main()
