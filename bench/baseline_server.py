"""A loraplex gRPC server whose engine is a baseline (bench/baselines.py), for load benchmarks.

    python -m loraplex.bench.baseline_server --kind naive|static|llama-reload --model SPEC \\
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
from loraplex.adapters.weights import LoadedAdapter
from loraplex.bench.baselines import PeftStaticEngine
from loraplex.bench.llama_reload import LlamaReloadEngine
from loraplex.server import models
from loraplex.server.engine.api import Engine
from loraplex.server.engine.gguf_convert import gguf_lora_file
from loraplex.server.engine.gguf_serving import gguf_base_spec
from loraplex.server.serve import ServeConfig, start

KINDS = ["naive", "static", "llama-reload"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--adapter-roots", type=Path, action="append", default=[])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-rows", type=int, default=16, help="static batches only")
    parser.add_argument("--max-queue", type=int, default=4096)
    args = parser.parse_args(argv)
    rows = args.batch_rows if args.kind == "static" else 1
    config = ServeConfig(
        model=args.model, port=args.port, metrics=False, max_batch_sequences=rows,
        max_adapters_per_step=rows, max_queue=args.max_queue, adapter_roots=args.adapter_roots,
    )  # fmt: skip
    engine, store = build(args.kind, config, rows)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = start(config, engine, store)
    print(f"baseline {args.kind} serving on port {running.port}", file=sys.stderr, flush=True)
    while not stop.wait(timeout=0.5):
        pass
    running.drain(grace_s=5)
    return 0


def build(kind: str, config: ServeConfig, rows: int) -> tuple[Engine, AdapterStore]:
    source = models.resolve(config.model, config.cache_dir)
    roots, residents, resident_bytes = config.adapter_roots, 1 << 16, 1 << 40  # no eviction
    if kind == "llama-reload":
        if source.format != "gguf":
            raise SystemExit(f"--kind llama-reload needs a GGUF model; {config.model} is not one")
        files: dict[tuple[str, int], Path] = {}

        def prepare(adapter: LoadedAdapter) -> None:
            identity = source.sha256 or str(source.path)
            file = gguf_lora_file(adapter.adapter_id, Path(adapter.path), source.path,
                                  identity, config.cache_dir)  # fmt: skip
            files[adapter.adapter_id, adapter.version] = file

        base, _ = gguf_base_spec(source.path, 1024)
        store = AdapterStore(roots, max_resident=residents, max_resident_bytes=resident_bytes,
                             base=base, prepare=prepare)  # fmt: skip
        return LlamaReloadEngine(source.path, lambda ref: files[ref.adapter_id, ref.version]), store
    store = AdapterStore(roots, max_resident=residents, max_resident_bytes=resident_bytes)
    return PeftStaticEngine(models.hf_checkpoint(source, config.cache_dir), store, rows), store


if __name__ == "__main__":
    sys.exit(main())
