"""Chat messages become one prompt through the tokenizer's template, with a single BOS."""

from __future__ import annotations

import pytest
from tiny import build_tokenizer
from tokenizers import processors

from loraplex.server.serve import TokenizerChat

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("encode_adds_bos", [False, True])
def test_chat_prompt_has_one_bos(encode_adds_bos: bool) -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    if encode_adds_bos:
        bos = (tokenizer.bos_token, tokenizer.bos_token_id)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", special_tokens=[bos]
        )
    messages = [{"role": "user", "content": "hello world"}]
    ids = tokenizer.encode(TokenizerChat(tokenizer).apply_chat_template(messages))
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    want = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(want, list):
        want = want["input_ids"]
    assert ids == want
