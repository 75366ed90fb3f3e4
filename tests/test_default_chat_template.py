"""Chat templates for models whose files carry none: --chat-template, and Gemma 3's for the
default model (its GGUF file on PyPI has none), checked against llama.cpp's own Gemma
template."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from loraplex.server.chat_template import DEFAULT_MODEL_TEMPLATE, TemplateChat, chosen_template
from loraplex.server.config import ConfigError

CONVERSATIONS = [
    [("user", "Hi there")],
    [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "2+2?")],
    [("user", "  spaced  "), ("assistant", "ok"), ("user", "multi\nline")],
]


def llama_cpp_gemma(messages: list[tuple[str, str]]) -> str:
    """llama.cpp's built-in Gemma template (llama_chat_apply_template with "gemma")."""
    import llama_cpp

    array = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=r.encode(), content=c.encode()) for r, c in messages]
    )
    buffer = ctypes.create_string_buffer(1 << 14)
    size = llama_cpp.llama_chat_apply_template(b"gemma", array, len(messages), True, buffer,
                                               len(buffer))  # fmt: skip
    return buffer.raw[:size].decode()


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_default_models_template_renders_as_llama_cpps_gemma(
    messages: list[tuple[str, str]],
) -> None:
    chat = TemplateChat(DEFAULT_MODEL_TEMPLATE.read_text(), {"bos_token": "<bos>"}, True)
    rendered = chat.apply_chat_template([{"role": r, "content": c} for r, c in messages])
    assert rendered == llama_cpp_gemma(messages)


def test_which_template_is_used(tmp_path: Path) -> None:
    mine = tmp_path / "mine.jinja"
    mine.write_text("{{ messages[0]['content'] }}")
    default = DEFAULT_MODEL_TEMPLATE.read_text()
    assert chosen_template("own", mine, True) == mine.read_text()  # the flag wins
    assert chosen_template("own", None, True) == "own"  # then the model's own
    assert chosen_template(None, None, True) == default  # then Gemma 3's, default model only
    assert chosen_template("", None, False) is None
    with pytest.raises(ConfigError, match="--chat-template: cannot read"):
        chosen_template(None, tmp_path / "missing.jinja", False)


def test_serve_uses_the_flags_template_on_the_hf_backend(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    from loraplex.server.serve import ServeConfig, build_backend

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    config = ServeConfig(model=str(tiny_checkpoints["llama"]), quantization="fp32",
                         cache_dir=cache_dir, chat_template=template)  # fmt: skip
    _, _, chat = build_backend(config)
    assert chat is not None
    assert chat.apply_chat_template([{"role": "user", "content": "Hi"}]) == "[user] Hi\n"
    _, _, none = build_backend(config.model_copy(update={"chat_template": None}))
    assert none is None  # the tiny tokenizer has no template, and it is not the default model
