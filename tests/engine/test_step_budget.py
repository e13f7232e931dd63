"""Tokens per step: the device platform's default unless `max_num_batched_tokens` is given."""

from __future__ import annotations

import pytest
from fixtures_models import save_model

from tessera import LLM, SamplingParams
from tessera.backends.cpu.platform import CpuPlatform
from tessera.core.errors import ConfigError

MAX_LEN = 1024


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("budget") / "tiny", max_position_embeddings=MAX_LEN)


def budget(llm: LLM) -> int:
    return llm.engine.scheduler.config.max_num_batched_tokens


def test_without_a_budget_the_engine_takes_the_platforms(model_path):
    assert CpuPlatform.default_max_num_batched_tokens == 512
    assert budget(LLM(model_path, dtype="float32")) == 512


def test_a_given_budget_is_kept(model_path):
    assert budget(LLM(model_path, dtype="float32", max_num_batched_tokens=64)) == 64


def test_without_chunked_prefill_the_default_grows_to_a_whole_prompt(model_path):
    assert budget(LLM(model_path, dtype="float32", enable_chunked_prefill=False)) == MAX_LEN


def test_without_chunked_prefill_a_given_budget_below_a_whole_prompt_is_refused(model_path):
    # the model's max_model_len (1024) is only known once it is loaded; a set value is not raised
    with pytest.raises(ConfigError, match="max_num_batched_tokens=512 is below max_model_len"):
        LLM(model_path, dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=512)
    # one whole prompt of this model is enough (it was checked against a default length of 2048)
    assert budget(LLM(model_path, dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=MAX_LEN)) == MAX_LEN


def steps_for_a_100_token_prompt(llm: LLM) -> int:
    before = llm.engine.num_steps
    llm.generate([list(range(3, 103))], SamplingParams(max_tokens=1, ignore_eos=True))
    return llm.engine.num_steps - before


def test_the_platform_default_sizes_the_steps(model_path, monkeypatch):
    # a platform plugin sets its own default: at 48 the prompt takes 3 steps (48, 48, 4), 2 more
    # than in one 512-token step
    whole = steps_for_a_100_token_prompt(LLM(model_path, dtype="float32"))
    monkeypatch.setattr(CpuPlatform, "default_max_num_batched_tokens", 48)
    llm = LLM(model_path, dtype="float32")
    assert budget(llm) == 48
    assert steps_for_a_100_token_prompt(llm) == whole + 2
