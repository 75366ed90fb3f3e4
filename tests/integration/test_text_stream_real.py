"""The streamed text of Gemma 3's own tokenizer (sentencepiece with byte fallback) equals
tokenizer.decode of all the tokens, with and without stop sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_token_choice import assert_streams_decode
from transformers import AutoTokenizer

pytestmark = pytest.mark.integration


def test_gemma_tokenizer_streams_its_decode(real_checkpoint: Path) -> None:
    assert_streams_decode(AutoTokenizer.from_pretrained(real_checkpoint), seeds=range(200))
