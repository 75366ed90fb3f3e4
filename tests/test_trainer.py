"""Train tiny models a few steps through `train.run` and check the result with PEFT itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_driver import run
from peft import PeftModel, get_peft_model
from peft_adapters import greedy_reference
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraplex.adapters.trainer import train
from loraplex.adapters.trainer.config import TrainConfig
from loraplex.adapters.trainer.output import METADATA_FILE, OutputExists
from loraplex.adapters.trainer.peft_setup import adapter_config
from loraplex.adapters.trainer.tasks import TASKS
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine

DATA = {
    "sft": TASKS["json-extract"].path("train"),
    "dpo": TASKS["concise"].path("train"),
    "reward": TASKS["concise"].path("train"),
    "grpo": TASKS["concise"].path("train"),
}
ADAPTER_KEYS = ("lora_A", "lora_B", "vera_lambda", "vera_A", "vera_B")


def make_config(checkpoint: Path, out: Path, cache: Path, **overrides: Any) -> TrainConfig:
    method = overrides.get("method", "sft")
    settings: dict[str, Any] = {
        "model": str(checkpoint),
        "cache_dir": cache,
        "quantization": "none",
        "data": DATA[method],
        "output": out,
        "max_steps": 3,
        "batch_size": 2,
        "max_length": 96,
        "learning_rate": 5e-3,
        "optimizer": "adamw_torch",
        "progress": False,
        **overrides,
    }
    return TrainConfig(**settings)


def base_model(checkpoint: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def base_weights(peft_model: Any) -> dict[str, torch.Tensor]:
    """The wrapped base model's own tensors, under the names the plain model uses."""
    state = peft_model.get_base_model().state_dict()
    return {
        key.replace(".base_layer", ""): value
        for key, value in state.items()
        if not any(part in key for part in ADAPTER_KEYS)
    }


def logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 40, 77, 12, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["sft", "dpo"])
@pytest.mark.parametrize("adapter_type", ["lora", "vera"])
def test_training_changes_adapter_not_base_and_reloads(
    tiny_checkpoint: Path, tmp_path: Path, method: str, adapter_type: str
) -> None:
    config = make_config(
        tiny_checkpoint,
        tmp_path / "adapter",
        tmp_path / "cache",
        method=method,
        adapter_type=adapter_type,
    )
    result = train.run(config)
    trained = result.model.eval()

    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert saved and all(any(k in key for k in ADAPTER_KEYS) for key in saved)
    torch.manual_seed(config.seed)
    fresh = get_peft_model(base_model(tiny_checkpoint), adapter_config(config))
    initial = {k: v for k, v in fresh.state_dict().items() if "lambda" in k or "lora_" in k}
    now = {k: v for k, v in trained.state_dict().items() if k in initial}
    assert initial.keys() == now.keys()
    assert any(not torch.equal(initial[k], now[k]) for k in initial), "adapter did not train"

    original = base_model(tiny_checkpoint)
    base_now = base_weights(trained)
    assert base_now.keys() == original.state_dict().keys()
    assert all(torch.equal(base_now[k], v) for k, v in original.state_dict().items())
    assert not torch.allclose(logits(trained), logits(original), atol=1e-4)

    reloaded = PeftModel.from_pretrained(base_model(tiny_checkpoint), result.adapter_dir)
    torch.testing.assert_close(logits(reloaded), logits(trained), rtol=1e-5, atol=1e-5)
    assert_engine_serves_it(tiny_checkpoint, result.adapter_dir, reloaded)


def assert_engine_serves_it(checkpoint: Path, adapter_dir: Path, reference: Any) -> None:
    """The output directory is an adapter root entry: the engine serves it by its folder name,
    token for token as PEFT generates with it."""
    engine = HFEngine.from_config(
        EngineConfig(checkpoint=checkpoint, quantization="fp32", adapter_roots=[adapter_dir.parent])
    )
    prompt = engine.encode("Record: Ana Silva (41) works as a pilot in Lisbon.\nJSON:")
    ref = engine.store.acquire(adapter_dir.name)
    request = SequenceRequest("r", prompt, SamplingParams(max_new_tokens=8), ref)
    served = run(engine, {0: [request]})["r"].tokens
    assert served == greedy_reference(reference, prompt, 8).tokens


def test_metadata_records_base_data_and_metrics(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = make_config(
        tiny_checkpoints["llama"],
        tmp_path / "meta",
        tmp_path / "cache",
        eval_split=0.1,
        save_dtype="bfloat16",
    )
    result = train.run(config)
    meta = json.loads((result.adapter_dir / METADATA_FILE).read_text())
    assert meta["id"] == "meta" and meta["method"] == "sft"
    assert len(meta["base"]["sha256"]) == 64
    assert len(meta["data"]["sha256"]) == 64 and meta["data"]["eval_rows"] == 40
    assert meta["adapter"]["peft_type"] == "LORA" and meta["adapter"]["r"] == 8
    assert meta["hyperparameters"]["learning_rate"] == 5e-3
    assert "train_loss" in meta["metrics"] and "eval_loss" in meta["metrics"]
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    PeftModel.from_pretrained(base_model(tiny_checkpoints["llama"]), result.adapter_dir)


def test_nf4_base_trains(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    config = make_config(
        tiny_checkpoints["gemma3"],
        tmp_path / "nf4",
        tmp_path / "cache",
        quantization="nf4",
        optimizer="auto",
    )
    result = train.run(config)
    meta = json.loads((result.adapter_dir / METADATA_FILE).read_text())
    assert meta["base"]["quantization"] == "nf4"
    assert meta["hyperparameters"]["optimizer"] == "adamw_8bit"
    assert meta["metrics"]["train_loss"] > 0


def test_output_is_atomic_and_not_overwritten_by_default(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "root" / "adapter"
    config = make_config(tiny_checkpoints["gemma3"], out, tmp_path / "cache", max_steps=1)
    train.run(config)
    with pytest.raises(OutputExists):
        train.run(config)
    train.run(config.model_copy(update={"overwrite": True, "seed": 1}))
    assert [p.name for p in out.parent.iterdir()] == ["adapter"], "temporary directories left"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "adapter directory left private"
    assert json.loads((out / METADATA_FILE).read_text())["hyperparameters"]["seed"] == 1


def test_resume_from_checkpoint_reproduces_the_run(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    config = make_config(
        tiny_checkpoints["gemma3"],
        tmp_path / "a",
        tmp_path / "cache",
        max_steps=4,
        save_steps=2,
        checkpoint_dir=ckpt,
    )
    first = train.run(config)
    assert {p.name for p in ckpt.iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    resumed = train.run(config.model_copy(update={"output": tmp_path / "b", "resume": True}))
    a = load_file(str(first.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_from_init_adapter_uses_it_as_reference(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoints["gemma3"]
    sft = train.run(make_config(checkpoint, tmp_path / "sft", tmp_path / "cache"))
    dpo = train.run(
        make_config(
            checkpoint,
            tmp_path / "dpo",
            tmp_path / "cache",
            method="dpo",
            init_adapter=sft.adapter_dir,
        )
    )
    model = dpo.model
    assert set(model.peft_config) == {"default", "ref"}
    sft_weights = load_file(str(sft.adapter_dir / "adapter_model.safetensors"))
    state = model.state_dict()
    for key, value in sft_weights.items():
        ref_key = key.replace(".weight", ".ref.weight")
        assert torch.equal(state[ref_key], value), f"reference {ref_key} is not the SFT adapter"
    saved = load_file(str(dpo.adapter_dir / "adapter_model.safetensors"))
    assert saved.keys() == sft_weights.keys()
    assert any(not torch.equal(saved[k], sft_weights[k]) for k in saved)


def test_eval_steps_score_the_eval_rows_during_training(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = make_config(tiny_checkpoints["llama"], tmp_path / "evals", tmp_path / "cache",
                         eval_split=0.1, eval_steps=1, logging_steps=1)  # fmt: skip
    result = train.run(config)
    evaluated = [entry["step"] for entry in result.history if "eval_loss" in entry]
    assert evaluated[:3] == [1, 2, 3]


def test_packing_fills_the_sequences(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Packed, each step trains on more tokens of the same short rows."""
    tokens = {}
    for packing in (False, True):
        config = make_config(tiny_checkpoints["llama"], tmp_path / f"packed-{packing}",
                             tmp_path / "cache", packing=packing, logging_steps=1,
                             max_length=512)  # fmt: skip
        history = train.run(config).history
        tokens[packing] = max(entry.get("num_tokens", 0) for entry in history)
    assert tokens[True] > 1.5 * tokens[False] > 0, tokens


def test_packing_and_report_to_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--packing is for SFT only"):
        make_config(tmp_path, tmp_path / "o", tmp_path / "c", method="dpo", packing=True)
    config = make_config(tmp_path, tmp_path / "o", tmp_path / "c", report_to="tensorboard, wandb")
    args = train._trl_args(config, torch.device("cpu"), has_eval=False)
    assert args.report_to == ["tensorboard", "wandb"] and args.eval_strategy == "no"


@pytest.mark.parametrize(
    ("choice", "device", "expected"),
    [("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_gradient_checkpointing_is_on_where_memory_is_short(
    tmp_path: Path, choice: str, device: str, expected: bool
) -> None:
    """TRL turns it on by default; on the CPU it only slows each step."""
    config = make_config(tmp_path, tmp_path / "o", tmp_path / "c", gradient_checkpointing=choice)
    common = train._common_args(config, torch.device(device), has_eval=False)
    assert common["gradient_checkpointing"] is expected


def test_the_fused_head_scores_only_labelled_positions_with_the_same_loss(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU TRL's fused LM head scored every position, prompt tokens included; the
    trainer has it score the labelled ones only, for the same loss."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    config = make_config(tiny_checkpoints["llama"], tmp_path / "o", tmp_path / "c")
    base = train.resolve_base(config)
    trainer = train.build_trainer(config, train.load_data(config), base, torch.device("cpu"))
    batch = next(iter(trainer.get_train_dataloader()))
    scored: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda *args: scored.append(len(args[0])) or apply(*args))  # fmt: skip
    compact = trainer.model(**batch, fused_lm_head=True).loss
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)  # TRL's own
    every = trainer.model(**batch, fused_lm_head=True).loss
    labels = batch["labels"][:, 1:]
    assert scored == [int((labels != -100).sum()), labels.numel()]
    assert scored[0] < scored[1]
    torch.testing.assert_close(compact, every, atol=1e-5, rtol=1e-5)
