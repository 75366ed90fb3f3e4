"""Chat over the OpenAI-compatible HTTP API on both backends, as `serve` builds them: the
gguf backend templates from the GGUF file's `tokenizer.chat_template` (the default base,
copied with a template added), the hf backend from the tokenizer's (a tiny checkpoint). The
oracle is transformers' own `apply_chat_template`; and over gRPC a seeded sampled request gets
the tokens it gets over HTTP."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from loraplex.clients import Client
from loraplex.server.models import ModelSource
from loraplex.server.serve import RunningServer, ServeConfig, build_backend, start

pytestmark = pytest.mark.integration
# Gemma's turn markers, the bos_token global and a filter: what real templates use.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "Name three colors."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": " And three fruits? "},
]
GGUF_ALIGNMENT = 32  # the default base sets no general.alignment
GGUF_STRING = 8


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", GGUF_STRING, len(v)) + v


def with_chat_template(source: Path, target: Path, template: str) -> Path:
    """A copy of a GGUF file with `tokenizer.chat_template` added. The new key-value pairs go
    right after the header, the second padding them to the file's alignment, so the tensor
    data (whose offsets count from an aligned start) moves by whole alignment units."""
    kv = _kv_string("tokenizer.chat_template", template)
    pad_key = "loraplex.test.padding"
    padding = -(len(kv) + len(_kv_string(pad_key, ""))) % GGUF_ALIGNMENT
    kv += _kv_string(pad_key, " " * padding)
    with source.open("rb") as src, target.open("wb") as out:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", src.read(24))
        out.write(struct.pack("<4sIQQ", magic, version, n_tensors, n_kv + 2) + kv)
        shutil.copyfileobj(src, out, 1 << 20)
    return target


def serve(model: Path, backend: str, roots: Path, **overrides: object) -> RunningServer:
    config = ServeConfig(
        model=str(model), backend=backend, adapter_roots=[roots], port=0, http_port=0,
        metrics=False, max_batch_sequences=2, max_context=256, **overrides,
    )  # type: ignore[arg-type]  # fmt: skip
    engine, store, chat = build_backend(config)
    assert chat is not None, "the template was not found"
    return start(config, engine, store, chat)


def client(server: RunningServer) -> openai.OpenAI:
    url = f"http://127.0.0.1:{server.http_port}/v1"
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def gguf_server(
    real_model: ModelSource, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    scratch = tmp_path_factory.mktemp("gguf-chat")
    model = with_chat_template(real_model.path, scratch / "templated.gguf", TEMPLATE)
    server = serve(model, "gguf", scratch)
    yield server
    server.drain(grace_s=5)


@pytest.fixture(scope="module")
def hf_server(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    scratch = tmp_path_factory.mktemp("hf-chat")
    checkpoint = scratch / "tiny"
    shutil.copytree(tiny_checkpoints["llama"], checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(checkpoint)
    server = serve(checkpoint, "hf", scratch, quantization="fp32", device="cpu")
    yield server, checkpoint
    server.drain(grace_s=5)


def check_chat(api: openai.OpenAI, tokenizer: AutoTokenizer) -> None:
    """Chat equals a completion of the prompt transformers renders, with one BOS."""
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    chat = api.chat.completions.create(
        model="",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    # The engine's encode adds the BOS itself where the tokenizer says so.
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    prompt = text.removeprefix(tokenizer.bos_token) if adds_bos else text
    plain = api.completions.create(model="", prompt=prompt, max_tokens=12, temperature=0)
    assert plain.usage is not None and plain.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.completion_tokens == 12 or chat.choices[0].finish_reason == "stop"


def test_gguf_chat_uses_the_files_template(
    gguf_server: RunningServer, real_checkpoint: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_checkpoint)  # the same vocabulary
    tokenizer.chat_template = TEMPLATE
    check_chat(client(gguf_server), tokenizer)


def test_hf_chat_uses_the_tokenizers_template(hf_server: tuple[RunningServer, Path]) -> None:
    server, checkpoint = hf_server
    check_chat(client(server), AutoTokenizer.from_pretrained(checkpoint))


def test_grpc_and_http_sample_the_same_tokens(gguf_server: RunningServer) -> None:
    prompt = "The three primary colors are"
    with Client(f"127.0.0.1:{gguf_server.port}", timeout=600) as grpc_client:
        over_grpc = grpc_client.generate(
            prompt, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=11
        )
    over_http = client(gguf_server).completions.create(
        model="", prompt=prompt, max_tokens=16, temperature=0.9, top_p=0.95, seed=11
    )
    assert over_http.choices[0].text == over_grpc.text
    assert over_http.usage is not None
    assert over_http.usage.completion_tokens == over_grpc.completion_tokens
