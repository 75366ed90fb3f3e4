"""The `loraplex` command: one subcommand per user task, each driven by its typed config."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from collections.abc import Sequence

from loraplex.adapters.trainer import cli as trainer_cli
from loraplex.clients.cli import add_adapters_parser, add_drain_parser, add_generate_parser
from loraplex.server.config import ConfigError, ModelConfig, add_config_arguments, config_from_args
from loraplex.server.errors import LoraplexError
from loraplex.server.fleet.cli import add_fleet_parser
from loraplex.server.serve import add_serve_parser


def _model_prepare(args: argparse.Namespace) -> int:
    from loraplex.server import models

    config = config_from_args(ModelConfig, args)
    source = models.resolve(config.model, config.cache_dir)
    print(f"model {source.spec}: {source.format} at {source.path}", file=sys.stderr)
    checkpoint = models.hf_checkpoint(source, config.cache_dir)
    print(f"transformers checkpoint ready at {checkpoint}", file=sys.stderr)
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from loraplex.server import models

    config = config_from_args(ModelConfig, args)
    print(json.dumps(models.describe(config.model, config.cache_dir), indent=2))
    return 0


BENCH_SUITES = {
    "engine": "the hf engine against PEFT baselines: throughput ratios, load time, RSS",
    "grpc": "the gRPC server: time to first token, server against engine alone",
    "http": "the OpenAI-compatible HTTP front end against gRPC on one server: throughput ratio",
    "lora": "the two ways of applying per-row LoRA deltas (grouped by adapter, gathered per row)",
    "gguf": "the GGUF backend against raw llama-cpp-python (Q4_K_M, Q5_K_M)",
    "load": "a seeded multi-adapter workload against a live server, swept; JSON, table, plots",
    "readme": "the README's load figures: saturation sweep, then 70% load against baselines",
    "peers": "loraplex against vLLM's CPU build and llama-server, same load (when installed)",
    "fleet": "replicas on Ray Serve: overhead, adapter placement against Ray's own router",
    "grammar": "the structured-output libraries (llguidance, xgrammar) on the default vocabulary",
    "grpo": "GRPO rollouts on loraplex's engine against TRL's generate: seconds per step",
    "soak": "a long mixed run with adapter churn: failures, RSS growth and leaks (20 min)",
}


def _add_bench(commands: argparse._SubParsersAction) -> None:
    suites = "\n".join(f"  {name:<8}{text}" for name, text in BENCH_SUITES.items())
    bench = commands.add_parser(
        "bench",
        help="run a benchmark on the default model",
        description=f"Run one benchmark; it prints its figures as a table and JSON.\n\n{suites}"
        "\n\n`loraplex bench SUITE --help` lists the suite's own options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("suite", choices=sorted(BENCH_SUITES))
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the suite's own options")
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"loraplex.bench.{args.suite}_bench")
    module.main(args.options)
    return 0


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="prepare or describe a base model")
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare",
        help="assemble/download the base model and convert it for the hf backend",
        description="Assemble, download or check the base model, then convert a GGUF file into "
        "a transformers checkpoint in the cache. Later runs reuse the result.",
    )
    add_config_arguments(prepare, ModelConfig, positional="model")
    prepare.set_defaults(run=_model_prepare)
    info = actions.add_parser("info", help="print what a model spec resolves to, as JSON")
    add_config_arguments(info, ModelConfig, positional="model")
    info.set_defaults(run=_model_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Multi-adapter LLM inference server: one quantized base model, many "
        "LoRA/VeRA adapters per batch, hot-swapped over gRPC.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(commands)
    add_generate_parser(commands)
    adapter_actions = add_adapters_parser(commands)
    trainer_cli.add_export_gguf(adapter_actions)
    add_drain_parser(commands)
    add_fleet_parser(commands)
    _add_model_commands(commands)
    trainer_cli.add_train_adapter(commands)
    trainer_cli.add_eval_adapter(commands)
    _add_bench(commands)
    return parser


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota, file-size limit


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (LoraplexError, ConfigError, FileNotFoundError) as err:
        print(f"loraplex: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraplex: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in NO_ROOM:
            raise
        print(f"loraplex: error: no room to write ({err}); free some space and run again. "
              "A file that was being replaced is left as it was.", file=sys.stderr)  # fmt: skip
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
