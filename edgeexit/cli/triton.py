"""`edgeexit triton-repo BUNDLE --out REPO`: a Triton model repository from a bundle; `edgeexit triton REPO`:
serve it with the real Triton Inference Server that `make setup` installs (CPU)."""

from __future__ import annotations

import argparse
import signal
import sys

from edgeexit.cli.common import parse_int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triton-repo", help="write a Triton model repository from a bundle (same models as `edgeexit serve`)",
        description="Write a Triton model repository: <model> (whole model) and <model>@<split> (each tail), "
                    "with the names, inputs and outputs of `edgeexit serve`, dynamic batching and a README "
                    "saying what each flavour supports. Triton admits one datatype per input: write the "
                    "boundaries in the --encoding your agents use; zstd (--compress) cannot reach Triton.",
    )
    p.add_argument("bundle", help="bundle directory (<name>.edgeexit)")
    p.add_argument("--out", required=True, help="repository directory to write")
    p.add_argument("--flavour", choices=["python", "onnx"], default="python",
                   help="python: Python backend + onnxruntime (runs on `edgeexit triton`); onnx: the "
                        "onnxruntime_onnx platform, for a full Triton with GPUs (default python)")
    p.add_argument("--encoding", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="the boundary tensors' wire encoding: the agents' --encoding (default fp32)")
    p.add_argument("--raw-input", choices=["uint8", "fp32", "fp16"], default="uint8",
                   help="what the whole model takes: uint8 (agents send 8-bit pixels so: --split cloud, probes) "
                        "or fp32/fp16 (pixels off the k/255 grid, plain clients) (default uint8)")
    p.add_argument("--max-batch-size", type=int, default=64, help="rows per batch and per request (64)")
    p.add_argument("--preferred-batch-sizes", default="8,16",
                   help="comma-separated sizes dynamic batching aims for; 'none' for none (8,16)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="longest a request waits for others to batch with, microseconds (2000)")
    p.add_argument("--instances", type=int, default=1, help="model instances per model (per GPU with --gpus) (1)")
    p.add_argument("--kind", choices=["cpu", "gpu"], default="cpu",
                   help="where instances run: KIND_CPU or KIND_GPU instance groups (default cpu)")
    p.add_argument("--gpus", help="comma-separated GPU indices the instances go on, e.g. 0,1 (implies --kind gpu; "
                                  "default: every GPU Triton sees)")
    p.add_argument("--accelerator", choices=["tensorrt", "cuda"], default="tensorrt",
                   help="on GPUs: tensorrt (TensorRT first, then CUDA, then CPU) or cuda (then CPU) (tensorrt)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per segment, python flavour (1)")
    p.add_argument("--python-env", help="write this models' Python environment into each config.pbtxt "
                                        "(EXECUTION_ENV_PATH); default: none, `edgeexit triton` provides it")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_repo)

    t = subparsers.add_parser(
        "triton", help="serve a repository from `edgeexit triton-repo` with the real Triton server (CPU)",
        description="Start the tritonserver binary of the nvidia-pytriton wheel (installed by `make setup`; "
                    "nothing is installed here) on REPO. Prints 'ready on HOST:GRPC_PORT' once Triton's "
                    "ServerReady is true; SIGTERM/SIGINT are forwarded and it waits for Triton to exit "
                    "(about 4 s; its ports are free after). Triton's own log goes to stderr.",
    )
    t.add_argument("repository", help="model repository directory")
    t.add_argument("--host", default="127.0.0.1", help="address every endpoint listens on (default 127.0.0.1)")
    t.add_argument("--grpc-port", type=int, default=8001, help="OIP v2 gRPC port; 0 picks a free one (8001)")
    t.add_argument("--http-port", type=int, default=8000, help="HTTP port; 0 picks a free one (8000)")
    t.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port; 0 picks one (8002)")
    t.add_argument("--python-env", help="the models' Python environment (numpy<2, onnxruntime, zstandard, "
                                        "edgeexit); default $EDGEEXIT_TRITON_ENV, else .venv-triton")
    t.add_argument("--ready-timeout", type=float, default=90.0, help="seconds to wait for ready (90)")
    t.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level (0)")
    t.set_defaults(func=run_server)


def run_repo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeexit.exporters.triton_repo import RepoOptions, write_repository

    preferred = [] if args.preferred_batch_sizes.strip().lower() == "none" else parse_int_list(
        args.preferred_batch_sizes, "--preferred-batch-sizes")
    options = RepoOptions(
        flavour=args.flavour, encoding=args.encoding, raw_input=args.raw_input, max_batch_size=args.max_batch_size,
        preferred_batch_sizes=preferred, max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
        threads=args.threads, python_env=Path(args.python_env) if args.python_env else None,
        kind=args.kind, gpus=_gpus(args.gpus) if args.gpus else None, accelerator=args.accelerator,
    )
    models = write_repository(args.bundle, args.out, options, force=args.force)
    for m in models:
        print(f"{m.name}: {m.input} {m.datatype} -> {', '.join(m.outputs)}")
    where = "on GPUs" if options.on_gpu else "on the CPU"
    print(f"wrote {args.out} ({args.flavour} flavour, {len(models)} models {where}, bundle {models[0].digest})")
    if args.flavour == "python" and not options.on_gpu:
        print(f"serve it with `edgeexit triton {args.out}`")
    return 0


def _gpus(text: str) -> list[int]:
    """``--gpus 0,1``: GPU indices (0 is one; ``parse_int_list`` wants positive numbers)."""
    from edgeexit.errors import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--gpus takes comma-separated GPU indices, e.g. 0,1; got {text!r}") from None


def run_server(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeexit.triton_server import TritonOptions, TritonServer

    server = TritonServer(TritonOptions(
        Path(args.repository), host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, python_env=Path(args.python_env) if args.python_env else None,
        ready_timeout_s=args.ready_timeout, log_verbose=args.log_verbose,
    ))
    # Forward SIGTERM/SIGINT to Triton from the start, so a stop during its start-up is not lost.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: server.signal(s))
    server.start(stdout=sys.stderr)  # Triton's log on our stderr: stdout carries only our lines
    h = args.host
    print(f"triton: http on {h}:{server.http_port}, metrics on {h}:{server.metrics_port}/metrics", flush=True)
    print(f"ready on {server.target}", flush=True)  # the line launchers wait for
    rc = server.wait()
    return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc
