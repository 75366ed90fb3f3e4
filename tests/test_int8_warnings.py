"""An int8 base must not log bitsandbytes' input-cast notice once per layer per forward.

bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" through `logging`
on every int8 matmul whose input is not fp16 (the engine's fp32/bf16 activations), so a
server wrote it thousands of times after a few requests."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from loraplex.adapters.store import AdapterStore
from loraplex.server.engine.api import SamplingParams, SequenceRequest, StepPlan
from loraplex.server.engine.config import EngineConfig
from loraplex.server.engine.hf import HFEngine

CAST_NOTICE = "inputs will be cast from"
BNB_LOGGER = "bitsandbytes.autograd._functions"  # where bitsandbytes logs the notice


def test_int8_engine_steps_emit_no_input_cast_notice(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = EngineConfig(checkpoint=tiny_checkpoint, quantization="int8")
        engine = HFEngine.from_config(config, AdapterStore([]))
        params = SamplingParams(max_new_tokens=5)
        prompts = [("a", "The capital of France"), ("b", "hello world")]
        requests = [
            SequenceRequest(seq_id, engine.encode(text), params) for seq_id, text in prompts
        ]
        events = engine.step(StepPlan(prefill=requests))
        for _ in range(3):
            events += engine.step(StepPlan(decode=["a", "b"]))
    assert events and all(event.error is None for event in events)
    kinds = {type(layer.base_layer).__name__ for layer in engine.base.layers.values()}
    assert kinds == {"Linear8bitLt"}
    logged = [r.getMessage() for r in caplog.records if CAST_NOTICE in r.getMessage()]
    warned = [str(w.message) for w in caught if CAST_NOTICE in str(w.message)]
    assert logged == [] and warned == []
    # Scoped to that notice: the same logger's other records still pass.
    logging.getLogger(BNB_LOGGER).warning("MatMul8bitLt: something else")
    assert caplog.records[-1].getMessage() == "MatMul8bitLt: something else"
