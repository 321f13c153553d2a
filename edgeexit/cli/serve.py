"""`edgeexit serve BUNDLE`: the cloud offload service (whole model and every tail) over OIP v2 gRPC."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from edgeexit.cli.common import add_backend_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a bundle's whole model and every tail over OIP v2 gRPC (the cloud side)",
        description="Serve <model> (whole model) and <model>@<split> (the tail after each split point) over the "
                    "Open Inference Protocol v2 gRPC API, with dynamic batching. Prints 'ready on HOST:PORT' "
                    "when serving; SIGTERM/SIGINT drain in-flight requests and exit 0.",
    )
    p.add_argument("bundle", help="bundle directory (<name>.edgeexit)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one (default 8001)")
    p.add_argument("--tls-cert", help="PEM server certificate (enables TLS, needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA that must sign client certificates (mutual TLS)")
    p.add_argument("--token-file", help="file holding a bearer token every inference call must present")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows per dynamic batch; 1 = off (16)")
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0,
                   help="longest a request waits for others to batch with (2.0)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="rows that may wait per model (in flight with batching off); beyond it requests get "
                        "RESOURCE_EXHAUSTED at once, so devices fall back instead of waiting (256)")
    p.add_argument("--max-batch-rows", type=int, default=256,
                   help="most rows one request may carry; more get INVALID_ARGUMENT before decoding, and "
                        "ModelMetadata shows it as parameter edgeexit.max_batch_rows (256)")
    p.add_argument("--instances", type=int,
                   help="batches of one model computed at the same time, like Triton's instance count (default: "
                        "cores / --threads, so batching uses every core as unbatched requests do)")
    p.add_argument("--workers", type=int, default=16, help="gRPC worker threads (16)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus /metrics over HTTP on this port (8002 by convention, as Triton's)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on, independent of --host (default 127.0.0.1): plain HTTP "
                        "without TLS or token, so keep it on loopback unless a proxy or firewall guards it")
    p.add_argument("--http-port", type=int,
                   help="also serve OIP v2 over HTTP/REST (KServe v2 / Triton: tritonclient.http, curl) on --host at "
                        "this port, with the same TLS and token; 0 picks a free one, printed as 'http on HOST:PORT' "
                        "(default: off)")
    p.add_argument("--max-message-mb", type=float, default=64.0,
                   help="largest request/response in MiB; larger ones get RESOURCE_EXHAUSTED (64)")
    add_backend_args(p)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per segment session (1)")
    p.add_argument("--providers", default="cpu",
                   help="onnxruntime execution providers in order of preference, from cuda, tensorrt, cpu (e.g. "
                        "cuda,cpu); those this onnxruntime lacks are skipped with a warning, CPU is always the "
                        "fallback; GPUs need edgeexit[gpu] (default cpu)")
    p.add_argument("--drain-seconds", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight requests may take to finish (10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from edgeexit.errors import ConfigError
    from edgeexit.logs import event
    from edgeexit.runtime.backends import parse_providers
    from edgeexit.runtime.batching import BatchOptions
    from edgeexit.runtime.malloc import limit_malloc_arenas
    from edgeexit.runtime.metrics import ServerMetrics
    from edgeexit.runtime.oip_server import ServerOptions, build_server
    from edgeexit.runtime.security import read_token_file
    from edgeexit.runtime.service import ServiceOptions, build_handlers

    limit_malloc_arenas()  # before any worker thread allocates: see runtime/malloc.py

    if args.max_message_mb <= 0 or args.threads < 1 or args.workers < 1:
        raise ConfigError("--max-message-mb, --threads and --workers must be positive")
    instances = args.instances if args.instances is not None else max(1, (os.cpu_count() or 1) // args.threads)
    batching = BatchOptions(args.max_batch_size, args.max_batch_delay_ms, args.max_queue, instances)
    metrics = ServerMetrics()
    max_bytes = int(args.max_message_mb * (1 << 20))  # also bounds every decoded (decompressed) tensor
    service = ServiceOptions(args.backend, args.threads, batching, args.fmt, args.max_batch_rows, max_bytes,
                             providers=parse_providers(args.providers))
    handlers = build_handlers(args.bundle, service, metrics)
    options = ServerOptions(
        host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, token=read_token_file(args.token_file) if args.token_file else None,
        max_message_bytes=max_bytes, workers=args.workers,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, http_port=args.http_port,
    )
    server = build_server(handlers, options, metrics).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    models = ", ".join(h.name for h in handlers)
    extra = f"; metrics on {args.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    log = logging.getLogger("edgeexit.serve")
    digest = handlers[0].version
    event(log, "ready", target=f"{args.host}:{server.port}", models=[h.name for h in handlers],
          metrics_port=server.metrics_port, bundle=digest, providers=handlers[0].runner.session_providers)
    print(f"serving {models} (bundle {digest}){extra}", flush=True)
    if server.http_port is not None:  # before "ready on": launchers stop reading stdout there
        print(f"http on {args.host}:{server.http_port}", flush=True)
    print(f"ready on {args.host}:{server.port}", flush=True)  # the line launchers wait for
    while not stop.wait(0.5):
        pass
    event(log, "draining", grace_s=args.drain_seconds)
    server.stop(args.drain_seconds)
    event(log, "stop")
    return 0
