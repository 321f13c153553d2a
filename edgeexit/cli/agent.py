"""`edgeexit agent BUNDLE --cloud HOST:PORT`: the device-side process (torch-free)."""

from __future__ import annotations

import argparse

from edgeexit.cli.common import add_backend_args

SPLIT_HELP = (
    "where to cut: a split point N (the device runs segments 0..N), 'device' (never offload), 'cloud' (send "
    "the input), 'cascade@N' (the device runs segments 0..N with their exits and sends the rows left as their "
    "raw input to the whole model), or 'auto' (default): chosen per request by --adapt."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agent", help="serve a bundle on the device, offloading hard inputs to `edgeexit serve`",
        description="Serve the Open Inference Protocol v2 locally (model <name>, input 'input' FP32 [-1,C,H,W]; "
                    "outputs label INT64, probabilities FP32, exit INT32, decided INT32 with 0=device, 1=cloud, "
                    "2=device-fallback). Runs the bundle's head, answers confident rows on the device and "
                    "offloads the rest; on timeout or outage it answers locally. Never imports torch.")
    p.add_argument("bundle", help="path to a <name>.edgeexit bundle")
    p.add_argument("--cloud", metavar="HOST:PORT[,...]",
                   help="address of `edgeexit serve` (or Triton's gRPC port); several as a comma-separated list of "
                        "IP:PORT, or dns:///NAME:PORT for every address NAME resolves to: used round-robin, a server "
                        "that is down or draining is skipped (gRPC health checks). Omit to run device-only")
    p.add_argument("--split", default="auto", help=SPLIT_HELP)
    p.add_argument("--adapt", choices=["planner", "bandit", "off"], default="planner",
                   help="with --split auto: 'planner' = the planner's choice for the link as measured from real "
                        "offloads (re-planned with hysteresis; probes while device-only), 'bandit' = SplitEE-style "
                        "UCB over split points, 'off' = the split with the fewest fp32 boundary bytes in the first "
                        "half of the network")
    p.add_argument("--network", default="wifi",
                   help="network profile the planner assumes until offloads measure the link (default wifi)")
    p.add_argument("--emulate-device", metavar="CLASS",
                   help="EMULATION: run as slow as a device class (e.g. raspberry-pi-4), see --emulation")
    p.add_argument("--emulation", choices=["stretch", "cgroup"], default="stretch",
                   help="how --emulate-device slows the agent: 'stretch' (default) sleeps after each segment so its "
                        "compute takes the class's factor x its CPU time; 'cgroup' = the launcher already runs this "
                        "process under a CPU quota worth that factor (the testbed does, as root), so nothing is "
                        "stretched; refused when no quota below one core is found")
    p.add_argument("--emulation-measured", type=float, metavar="FACTOR",
                   help="with --emulation cgroup: the slowdown the launcher measured under the quota (reported only)")
    p.add_argument("--policy", default=None,
                   help="exit policy kind (confidence, entropy, margin, patience, ensemble, never); "
                        "default: the bundle's calibrated policy (never exit early if uncalibrated)")
    p.add_argument("--listen", default="127.0.0.1:8101", metavar="HOST:PORT|unix:PATH",
                   help="where apps reach the agent (default 127.0.0.1:8101, apart from serve's and Triton's 8001: "
                        "README, 'Ports'; port 0 picks one)")
    p.add_argument("--deadline-ms", type=float, default=1000.0, help="per-request budget (default 1000)")
    p.add_argument("--encoding", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="boundary tensor wire encoding (int8 uses the bundle's calibrated scale)")
    p.add_argument("--compress", action="store_true", help="zstd-compress boundary tensors")
    add_backend_args(p)
    p.add_argument("--threads", type=int, default=1, help="backend threads (default 1)")
    p.add_argument("--on-failure", choices=["best-exit", "finish-local"], default="best-exit",
                   help="when the cloud fails: the most confident exit so far, or run the rest locally")
    p.add_argument("--retries", type=int, default=1, help="offload retries within the deadline (default 1)")
    p.add_argument("--breaker-failures", type=int, default=3,
                   help="consecutive offload failures that open the circuit (default 3)")
    p.add_argument("--breaker-cooldown-s", type=float, default=5.0,
                   help="while the circuit is open the agent checks the cloud's health in the background (no user "
                        "request is sent) and closes it as soon as a check passes: after 0.25 s, then every 0.5 s "
                        "while unreachable; while the cloud refuses our token/TLS, from 1 s doubling to this many "
                        "seconds (default 5)")
    p.add_argument("--token-file", help="file holding the bearer token the cloud service requires")
    p.add_argument("--tls-ca", help="PEM CA of the cloud service's certificate (enables TLS to the cloud)")
    p.add_argument("--tls-cert", help="client certificate for mTLS to the cloud")
    p.add_argument("--tls-key", help="client key for mTLS to the cloud")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="check the cloud's certificates against NAME (grpc.ssl_target_name_override); required for "
                        "TLS to a list of addresses: a name every server's certificate carries")
    p.add_argument("--workers", type=int, default=4,
                   help="requests served at once (each runs the device's segments and its offload); more apps "
                        "than this queue in the agent (default 4)")
    p.add_argument("--max-batch-rows", type=int, default=256,
                   help="most rows one app request may carry; larger ones are refused before any compute "
                        "(default 256, as serve)")
    p.add_argument("--micro-batch-rows", type=int, default=1,
                   help="with --split device: app requests that arrive together run as one batch of at most this "
                        "many rows, each app getting its own rows (default 1: every request on its own; worth it "
                        "with more --workers, at more memory)")
    p.add_argument("--max-message-mb", type=float, default=64.0,
                   help="largest app message, and largest decoded (decompressed) input tensor, in MiB (default 64)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (8102 by convention: README, 'Ports')")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on, independent of --listen (default 127.0.0.1): plain HTTP "
                        "without TLS or token, so keep it on loopback unless a proxy or firewall guards it")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve OIP v2 over HTTP/REST (KServe v2 / Triton: tritonclient.http, curl) on the "
                        "--listen host at this port; 0 picks a free one, printed as 'http on HOST:PORT' (default: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeexit.errors import ConfigError
    from edgeexit.runtime.agent import Agent, AgentOptions
    from edgeexit.runtime.breaker import BreakerOptions, RetryOptions
    from edgeexit.runtime.client import ClientOptions
    from edgeexit.runtime.device import DeviceOptions
    from edgeexit.runtime.malloc import limit_malloc_arenas
    from edgeexit.runtime.security import read_token_file

    limit_malloc_arenas()  # before any worker thread allocates: see runtime/malloc.py

    client = ClientOptions(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           token=read_token_file(args.token_file) if args.token_file else None,
                           tls_server_name=args.tls_server_name)
    if not args.max_message_mb > 0:
        raise ConfigError(f"--max-message-mb must be positive, got {args.max_message_mb}")
    slowdown = _emulation(args)
    device = DeviceOptions(
        backend=args.backend, fmt=args.fmt, threads=args.threads, policy=args.policy, split=args.split,
        cloud=args.cloud,
        client=client, encoding=args.encoding, compress=args.compress, deadline_ms=args.deadline_ms,
        on_failure=args.on_failure, retry=RetryOptions(retries=args.retries), adapt=args.adapt,
        network=args.network, slowdown=slowdown, emulation=args.emulation,
        breaker=BreakerOptions(failure_threshold=args.breaker_failures, cooldown_s=args.breaker_cooldown_s),
    )
    Agent(args.bundle, AgentOptions(device=device, listen=args.listen, metrics_port=args.metrics_port,
                                    metrics_host=args.metrics_host, workers=args.workers, http_port=args.http_port,
                                    max_batch_rows=args.max_batch_rows, micro_batch_rows=args.micro_batch_rows,
                                    max_message_bytes=int(args.max_message_mb * (1 << 20)))).serve_forever()
    return 0


def _emulation(args: argparse.Namespace) -> float:
    """The device class's slowdown (1.0 without --emulate-device); prints which emulation runs."""
    from edgeexit.emulation import Emulation, own_cpu_quota
    from edgeexit.errors import ConfigError
    from edgeexit.profiles import load_device_class

    if not args.emulate_device:
        if args.emulation == "cgroup":
            raise ConfigError("--emulation cgroup needs --emulate-device CLASS (the factor the quota stands for)")
        return 1.0
    dev = load_device_class(args.emulate_device)
    quota = None
    if args.emulation == "cgroup":
        quota = own_cpu_quota()
        if quota is None or quota >= 1.0:
            raise ConfigError("--emulation cgroup: this process runs under no CPU quota below one core; start it "
                              "through the testbed (which sets one up as root) or use --emulation stretch")
    if dev.emulated:
        print(Emulation(dev.name, dev.slowdown, args.emulation, quota, args.emulation_measured).describe(), flush=True)
    return dev.slowdown
