"""Guided decoding in the engine: a finished constraint ends the request even when the request
asks to go on (ignore_eos, min_tokens), with finish_reason "stop" and the constrained text."""

from __future__ import annotations

import json

import pytest

from tessera import LLM, SamplingParams
from tessera.core.interfaces.guided import GuidedConstraint

CHOICES = ["yes", "no"]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, seed=0, max_model_len=512)


@pytest.mark.parametrize("backend", ["xgrammar", "outlines", "llguidance", "lm-format-enforcer"])
@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_tokens": 12}], ids=["ignore_eos", "min_tokens"])
def test_complete_constraint_stops_the_request(llm, backend, extra):
    params = SamplingParams(
        max_tokens=24, temperature=0,
        guided=GuidedConstraint("choice", json.dumps(CHOICES), backend=backend), **extra,
    )
    out = llm.generate("Is the sky blue? Answer yes or no.", params)[0].outputs[0]
    assert out.text in CHOICES
    assert out.finish_reason == "stop"
    assert len(out.token_ids) < 24
    assert llm.engine.kv_cache_manager.num_used_blocks == 0  # nothing leaked
