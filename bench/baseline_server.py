"""A loraplex gRPC server whose engine is a baseline (bench/baselines.py), for load benchmarks.

    python -m loraplex.bench.baseline_server --kind naive|static --model SPEC \\
        --adapter-roots DIR --port PORT [--batch-rows 16]

The scheduler, gRPC service and client-side timing are loraplex's own; only the engine
differs, so the same trace meets both through the same code path.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from loraplex.adapters.store import AdapterStore
from loraplex.bench.baselines import PeftStaticEngine
from loraplex.server import models
from loraplex.server.serve import ServeConfig, start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=["naive", "static"], required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--adapter-roots", type=Path, action="append", default=[])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-rows", type=int, default=16, help="static batches only")
    parser.add_argument("--max-queue", type=int, default=4096)
    args = parser.parse_args(argv)
    rows = 1 if args.kind == "naive" else args.batch_rows
    config = ServeConfig(
        model=args.model, port=args.port, metrics=False, max_batch_sequences=rows,
        max_adapters_per_step=rows, max_queue=args.max_queue, adapter_roots=args.adapter_roots,
    )  # fmt: skip
    checkpoint = models.hf_checkpoint(
        models.resolve(config.model, config.cache_dir), config.cache_dir
    )
    store = AdapterStore(args.adapter_roots, max_resident=1 << 16, max_resident_bytes=1 << 40)
    engine = PeftStaticEngine(checkpoint, store, rows)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = start(config, engine, store)
    print(f"baseline {args.kind} serving on port {running.port}", file=sys.stderr, flush=True)
    while not stop.wait(timeout=0.5):
        pass
    running.drain(grace_s=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
