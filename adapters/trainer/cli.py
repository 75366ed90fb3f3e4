"""The trainer's commands: `train-adapter`, `eval-adapter` and `adapters export-gguf`.

Each `add_*` function registers one command on a subparsers object owned by the main CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplex.adapters.trainer.config import EvalConfig, ExportGgufConfig, TrainConfig
from loraplex.server.config import add_config_arguments, config_from_args

TRAIN_DESCRIPTION = """\
Train a LoRA or VeRA adapter on a quantized base (QLoRA: NF4 with double quantization by
default) with supervised fine-tuning or DPO, and write it atomically as a PEFT adapter
directory with a loraplex-adapter.json metadata file. SFT rows are {"prompt", "completion"}
or {"messages": [...]}; the loss covers the completion only. DPO rows are {"prompt",
"chosen", "rejected"}; the reference is the base with the adapter disabled, or the
--init-adapter when one is given."""


def add_train_adapter(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train-adapter",
        help="train a LoRA/VeRA adapter with QLoRA SFT or DPO",
        description=TRAIN_DESCRIPTION,
    )
    add_config_arguments(parser, TrainConfig)
    parser.set_defaults(run=_train)


def add_eval_adapter(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval-adapter",
        help="score an adapter against its base on a held-out split",
        description="SFT: exact match of the first generated line, adapter vs base. DPO: "
        "preference accuracy of the implicit reward and the conciseness of generations. "
        "Reward model: held-out pairwise accuracy (chosen rewarded above rejected). "
        "--server ADDR: score the adapter as a running loraplex server (any backend) serves "
        "it, by --metric.",
    )
    add_config_arguments(parser, EvalConfig, positional="adapter")
    parser.set_defaults(run=_eval)


def add_export_gguf(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "export-gguf",
        help="write a PEFT LoRA/VeRA adapter as a llama.cpp GGUF-LoRA file",
        description="Convert a PEFT adapter into a GGUF-LoRA for the base named by --model "
        "(a VeRA adapter becomes the exact LoRA of the same rank; rsLoRA and alpha patterns "
        "are folded into B).",
    )
    add_config_arguments(parser, ExportGgufConfig, positional="adapter")
    parser.set_defaults(run=_export_gguf)


def _train(args: argparse.Namespace) -> int:
    from loraplex.adapters.trainer import train

    config = config_from_args(TrainConfig, args)
    result = train.run(config)
    print(
        f"adapter written to {result.adapter_dir} in {result.train_seconds:.0f} s, "
        f"peak RSS {result.peak_rss_mb:.0f} MB",
        file=sys.stderr,
    )
    print(json.dumps(result.metrics, indent=2))
    return push(config.push, result.adapter_dir) if config.push else 0


def push(server: str, adapter_dir: Path) -> int:
    """Load the adapter into a running server by its id (the directory's name)."""
    from loraplex.clients import Client
    from loraplex.clients.errors import LoraplexClientError

    try:
        with Client(server, timeout=120) as client:
            info = client.load_adapter(adapter_dir.name)
    except LoraplexClientError as err:
        print(
            f"loraplex train-adapter: the adapter is saved in {adapter_dir}, but the server at "
            f"{server} did not load it: {err}. Is {adapter_dir.parent} one of its "
            "--adapter-roots?",
            file=sys.stderr,
        )
        return 1
    print(f"loaded into {server} as {info.adapter_id} v{info.version}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from loraplex.adapters.trainer import evaluate

    config = config_from_args(EvalConfig, args)
    scores = evaluate.run(config)
    text = json.dumps(scores, indent=2)
    if config.output_json is not None:
        config.output_json.write_text(text + "\n")
    print(text)
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from loraplex.adapters.gguf_export import export_gguf
    from loraplex.server import models

    config = config_from_args(ExportGgufConfig, args)
    if config.adapter is None:
        raise FileNotFoundError("give the adapter directory to export")
    source = models.resolve(config.model, config.cache_dir)
    if source.format != "gguf":
        raise FileNotFoundError(f"--model {config.model} is not a GGUF base; export needs one")
    out = config.output or config.adapter / "adapter.gguf"
    export_gguf(config.adapter, source.path, out, config.dtype)
    print(f"GGUF-LoRA written to {out}", file=sys.stderr)
    return 0
