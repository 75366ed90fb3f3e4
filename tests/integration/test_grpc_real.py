"""The real `loraplex serve` on the default base (Gemma 3 270M, NF4) with two adapters:
concurrent clients get the tokens the engine gives each request alone."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_driver import run as engine_run
from peft_adapters import ADAPTER_CONFIGS, save_adapter
from server_process import ServerProcess
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.clients import Client
from loraplex.server.chat_template import DEFAULT_MODEL_TEMPLATE
from loraplex.server.engine.api import SamplingParams, SequenceRequest
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine
from loraplex.server.serve import ServeConfig

pytestmark = pytest.mark.integration
NEW_TOKENS = 10
PROMPTS = ["The three primary colors are", "Write a haiku about rain:"]
NAMES = ["lora-qv-r4", "rslora-all-r8"]


@pytest.fixture(scope="module")
def adapter_root(real_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real-adapters")
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint)
    for seed, name in enumerate(NAMES):
        save_adapter(base, ADAPTER_CONFIGS[name], root / name, seed=seed, std=0.02)
    return root


@pytest.fixture(scope="module")
def server(adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("real-logs") / "server.log"
    args = ["--adapter-roots", str(adapter_root), "--max-lora-rank", "16", "--log-level", "warning"]
    for name in NAMES:
        args += ["--preload-adapters", name]
    proc = ServerProcess(args, log)
    yield proc
    proc.stop()


def alone(real_checkpoint: Path, adapter_root: Path) -> dict[tuple[str, str], list[int]]:
    config = EngineConfig(
        checkpoint=real_checkpoint,
        quantization="nf4",
        max_lora_rank=16,
        adapter_roots=[adapter_root],
        # as the server's default batch, so the engine picks the same 4-bit kernel
        max_batch_size=ServeConfig.model_fields["max_batch_sequences"].default,
    )
    engine = HFEngine.from_config(config)
    tokens = {}
    for prompt in PROMPTS:
        for adapter in ["", *NAMES]:
            ref = engine.store.acquire(adapter) if adapter else None
            request = SequenceRequest("r", engine.encode(prompt), SamplingParams(NEW_TOKENS), ref)
            tokens[prompt, adapter] = engine_run(engine, {0: [request]})["r"].tokens
    return tokens


def test_concurrent_clients_match_the_engine_alone(
    server: ServerProcess, real_checkpoint: Path, adapter_root: Path
) -> None:
    jobs = [(p, a) for p in PROMPTS for a in ["", *NAMES]]
    with Client(server.target, timeout=600) as client:
        assert client.health() == "SERVING"
        assert {a.adapter_id for a in client.list_adapters() if a.resident} == set(NAMES)
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(
                pool.map(
                    lambda j: client.generate(j[0], adapter=j[1], max_new_tokens=NEW_TOKENS), jobs
                )
            )
        stream = client.stream(PROMPTS[0], adapter=NAMES[1], max_new_tokens=NEW_TOKENS)
        streamed = "".join(chunk.text for chunk in stream)
        has_template = client.server_info().chat_template
        chat = client.generate(messages=[("user", PROMPTS[1])], max_new_tokens=4)
    want = alone(real_checkpoint, adapter_root)
    for job, result in zip(jobs, results, strict=True):
        assert result.token_ids == want[job], job
    assert streamed == results[2].text
    # The default model's files carry no chat template; the server offers Gemma 3's, and the
    # prompt has the tokens transformers gives the same chat with that template.
    tokenizer = AutoTokenizer.from_pretrained(real_checkpoint)
    assert has_template and not tokenizer.chat_template
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], tokenize=True, add_generation_prompt=True,
        chat_template=DEFAULT_MODEL_TEMPLATE.read_text(),
    )  # fmt: skip
    if not isinstance(templated, list):
        templated = templated["input_ids"]
    assert chat.prompt_tokens == len(templated)
    for prompt in PROMPTS:
        assert len({tuple(want[prompt, a]) for a in ["", *NAMES]}) > 1, "adapters changed nothing"
