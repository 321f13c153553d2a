"""Triton Python-backend model for one edgeexit model name: ``<model>`` (the whole model) or ``<model>@<s>``
(the tail after split point ``s``), written into a repository by ``edgeexit triton-repo``.

It decodes the request with edgeexit's own wire codec (``edgeexit.runtime.codec``: the same checks as
``edgeexit serve``), so the models' environment has edgeexit installed (``--no-deps``: the codec and the
segment runner need only numpy, onnxruntime and zstandard). Its segments and manifest are in ``bundle/`` beside
this file; ``config.pbtxt`` says where the model starts (``edgeexit.start``) and how many threads a segment's
onnxruntime session gets (``edgeexit.threads``), which execution providers it asks for (``edgeexit.providers``,
e.g. ``cuda,cpu`` for a ``KIND_GPU`` instance, on that instance's GPU; CPU is the fallback) and the bundle's
digest (``edgeexit.bundle``), checked against the copied manifest at load.

Identity: a request whose ``edgeexit.bundle`` parameter names another bundle is refused (its own error, the others
in the batch still run) with UNSUPPORTED (gRPC UNIMPLEMENTED): Triton's Python backend offers no
FAILED_PRECONDITION. The message has the shape of ``edgeexit serve``'s ("... runs bundle <12 hex> ...").

Dynamic batching: Triton hands ``execute`` every request of a batch at once; their rows run as ONE batch
(decoded one by one, concatenated, split back), so batching saves work. A request that does not decode gets its
own INVALID_ARG error; the others still run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from edgeexit.bundle import Bundle, sha256_file
from edgeexit.errors import EdgeExitError, InvalidTensor
from edgeexit.runtime import codec
from edgeexit.runtime.runner import SegmentRunner, check_tensor

FORMAT = "onnx"
P_BUNDLE = "edgeexit.bundle"


class WrongBundle(Exception):
    """The request names another bundle than this model's (refused with UNSUPPORTED)."""


def _param(config: dict, key: str, default: str | None = None) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        if default is not None:
            return default
        raise EdgeExitError(f"config.pbtxt has no parameter {key!r}; regenerate the repository with "
                            "`edgeexit triton-repo BUNDLE --out REPO --force`") from None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        root = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self.start = int(_param(config, "edgeexit.start"))
        bundle = Bundle.load(root, verify=False)  # only this model's segments were copied: verify those
        n = len(bundle.manifest.segments)
        for k in range(self.start, n):
            entry = bundle.manifest.segments[k].files[FORMAT]
            if sha256_file(root / entry.path) != entry.sha256:
                raise EdgeExitError(f"{root / entry.path} fails its sha256 check; regenerate the repository")
        self.digest = bundle.digest
        if _param(config, P_BUNDLE) != self.digest:
            raise EdgeExitError(f"config.pbtxt names bundle {_param(config, P_BUNDLE)[:12]} but {root} holds "
                                f"{self.digest[:12]}; regenerate the repository with `edgeexit triton-repo --force`")
        on_gpu = args.get("model_instance_kind") == "GPU"
        self.runner = SegmentRunner(bundle, threads=int(_param(config, "edgeexit.threads")), fmt=FORMAT,
                                    providers=_param(config, "edgeexit.providers", "cpu").split(","),
                                    device_id=int(args.get("model_instance_device_id", 0)) if on_gpu else None)
        for k in range(self.start, n):
            self.runner.session(k)  # open now: no first-request stall
        m = bundle.manifest
        self.name = config["name"]
        self.spec = m.input if self.start == 0 else m.split_points[self.start - 1].tensor
        self.datatype = config["input"][0]["data_type"].removeprefix("TYPE_")  # what Triton let through
        self.exits = [j for seg in m.segments[self.start:] for j in seg.exits]

    def _decode(self, request) -> np.ndarray:
        """One request's input as a validated float32 batch, as ``runtime/oip_input.decode_input`` does it."""
        t = pb_utils.get_input_tensor_by_name(request, self.spec.name)
        if t is None:
            raise InvalidTensor(f"{self.name} takes input {self.spec.name!r}")
        if self.datatype == codec.PIXELS and self.start != 0:
            raise InvalidTensor(f"{self.name}: {codec.PIXELS} is only for raw pixels sent to the whole model")
        arr = t.as_numpy()
        params = json.loads(request.parameters() or "{}")
        self._check_bundle(params.get(P_BUNDLE))
        try:
            x = codec.decode(arr.tobytes(), self.datatype, list(arr.shape), params)
        except (ValueError, TypeError) as e:  # e.g. a scale or zero point that is not a number
            raise InvalidTensor(f"{self.spec.name}: cannot decode with the given parameters ({e}); check "
                                f"{codec.P_SCALE}, {codec.P_ZERO} and {codec.P_COMPRESSION}") from e
        if x.ndim > 0 and x.shape[0] == 0:
            raise InvalidTensor(f"{self.spec.name}: the batch is empty; send at least one row")
        check_tensor(x, self.spec)
        return x

    def _check_bundle(self, sent: object) -> None:
        """Refuse a request naming another bundle: answering it would be silently wrong mid-rollout."""
        if sent is None:
            return
        if not isinstance(sent, str):
            raise InvalidTensor(f"request parameter {P_BUNDLE!r} must be a string (the bundle's sha256 digest)")
        if sent.strip().lower() != self.digest:
            raise WrongBundle(f"{self.name}: this service runs bundle {self.digest[:12]}, the request names bundle "
                              f"{sent[:12]!r}; their answers differ. Roll the same bundle out to the device and the "
                              f"cloud (the repository's README and config parameter {P_BUNDLE!r} name its digest)")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        rows: list[tuple[int, np.ndarray]] = []
        for i, request in enumerate(requests):
            try:
                rows.append((i, self._decode(request)))
            except InvalidTensor as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
            except WrongBundle as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.UNSUPPORTED))
        if rows:
            try:
                x = np.concatenate([r for _, r in rows])
                if self.start == 0:
                    x = self.runner.normalize(x)
                out = self.runner.run(x, start=self.start)
            except Exception as e:  # noqa: BLE001  our own segments failed: the server's fault, not the client's
                err = pb_utils.TritonError(f"{self.name}: running the segments failed: {e}")
                for i, _ in rows:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            at = 0
            for i, r in rows:
                n = r.shape[0]
                tensors = [pb_utils.Tensor(f"exit{j}", np.ascontiguousarray(out.exits[j][at:at + n], np.float32))
                           for j in self.exits]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                at += n
        return responses
