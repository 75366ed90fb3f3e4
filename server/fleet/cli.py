"""`loraplex fleet`: several `loraplex serve` replicas behind Ray Serve's gRPC proxy."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

FLEET_HELP = """\
Start Ray (or join a cluster with --address), then Serve's gRPC proxy on --grpc-port with
loraplex's own gRPC service, Serve's HTTP proxy on --http-port with the OpenAI API, and
--replicas replicas, each running `loraplex serve` with the flags after `--` on 127.0.0.1 of
its node. Requests go to a replica chosen by adapter affinity; adapter commands go to every
replica. Serve's gRPC proxy listens on every interface in plaintext (and, with Ray, so do
its internal ports): keep the cluster behind a firewall or a TLS-terminating proxy; bearer
tokens (--auth-tokens-file) are checked by the replica that takes a call. Needs the `fleet`
extra (pip install 'loraplex[fleet]').

  loraplex fleet --replicas 2 -- --model gemma3-270m
  loraplex generate --server 127.0.0.1:9000 --adapter date-iso 'Date: May 1, 2020'
"""


def add_fleet_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fleet", help="run replicas on Ray Serve, routed by adapter", description=FLEET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = parser.add_argument
    add("--replicas", type=int, default=2, help="replicas (the minimum, when autoscaling)")
    add("--max-replicas", type=int, default=0, help="autoscale up to this many (0: fixed)")
    add("--grpc-port", type=int, default=9000, help="Serve's gRPC proxy port")
    add("--http-port", type=int, default=8000, help="the OpenAI HTTP API (Serve's HTTP proxy)")
    add("--http-host", default="127.0.0.1",
        help="where the HTTP API listens (0.0.0.0: every interface)")  # fmt: skip
    add("--max-resident-adapters", type=int, default=8, help="per replica")
    add("--max-batch-sequences", type=int, default=16, help="per replica")
    add("--max-queue", type=int, default=64, help="per replica, beyond a full batch")
    add("--router", choices=["affinity", "ray"], default="affinity",
        help="affinity: loraplex's router; ray: Serve's stock one (for comparison)")  # fmt: skip
    add("--replica-cpus", type=float, default=0.0,
        help="Ray CPUs each replica reserves; its server runs a thread fewer, at least "
             "one (default: this machine's CPUs shared out among --max-replicas or "
             "--replicas)")  # fmt: skip
    add("--auth-tokens-file", type=Path, default=None, help="as `loraplex serve` takes it")
    add("--address", default=None, help="an existing Ray cluster (default: start one here)")
    add("serve_args", nargs=argparse.REMAINDER, help="-- then `loraplex serve` flags")
    parser.set_defaults(run=run_fleet)


def run_fleet(args: argparse.Namespace) -> int:
    from loraplex.server.auth import load_tokens
    from loraplex.server.fleet import app

    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    config = app.FleetConfig(
        replicas=args.replicas, max_replicas=args.max_replicas,
        max_resident_adapters=args.max_resident_adapters,
        max_batch_sequences=args.max_batch_sequences, max_queue=args.max_queue,
        serve_args=serve_args, grpc_port=args.grpc_port, http_port=args.http_port,
        http_host=args.http_host, router=args.router,
        tokens=load_tokens(args.auth_tokens_file), replica_cpus=args.replica_cpus,
    )  # fmt: skip
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    app.start(config, address=args.address)
    print(f"loraplex fleet: {args.replicas} replicas serving gRPC on port {args.grpc_port}, "
          f"HTTP on {args.http_host}:{args.http_port}", flush=True)  # fmt: skip
    stopping.wait()
    app.stop(config)
    return 0
