"""The engine against transformers on the same weights, and invariant to batching, caching,
chunking and preemption; every KV block is free again afterwards."""

from __future__ import annotations

import random

import pytest
import torch
from fixtures_models import save_model

from tessera import LLM, SamplingParams
from tessera.core.errors import ContextLengthError

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_model(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randrange(5, 70))] for _ in range(count)]


def _make_llm(model_dir: str, **kwargs) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("num_blocks_override", 64)
    return LLM(model_dir, **kwargs)


def _assert_no_leak(llm: LLM) -> None:
    manager = llm.engine.kv_cache_manager
    assert manager.num_used_blocks == 0
    assert not llm.engine.scheduler.has_unfinished_requests()
    assert llm.engine.runner.requests == {}


def _greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _mixed_params(i: int) -> SamplingParams:
    if i % 3 == 0:
        return _greedy()
    return SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_greedy_matches_transformers_token_for_token(model_dir, hf_model):
    llm = _make_llm(model_dir)
    prompts = _prompts(4)
    outputs = llm.generate(prompts, _greedy())
    for prompt, output in zip(prompts, outputs):
        expected = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
            min_new_tokens=MAX_TOKENS, pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert output.outputs[0].token_ids == expected
    _assert_no_leak(llm)


def test_logprobs_match_transformers_log_softmax(model_dir, hf_model):
    llm = _make_llm(model_dir)
    prompt = _prompts(1, seed=3)[0]
    (output,) = llm.generate([prompt], _greedy(max_tokens=4, logprobs=5, prompt_logprobs=3))
    tokens = output.outputs[0].token_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
    reference = logits.log_softmax(-1)
    for step, position in enumerate(output.outputs[0].logprobs):
        row = reference[len(prompt) - 1 + step]
        chosen = position[tokens[step]]
        assert chosen.rank == 1
        assert abs(chosen.logprob - row[tokens[step]].item()) < 1e-4
        top = row.topk(5)
        for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(position[token_id].logprob - value) < 1e-4
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = output.prompt_logprobs[i][prompt[i]]
        assert abs(entry.logprob - reference[i - 1][prompt[i]].item()) < 1e-4
        assert entry.rank == int((reference[i - 1] > reference[i - 1][prompt[i]]).sum()) + 1


CONFIGS = {
    "default": {},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "chunked_prefill_32": {"max_num_batched_tokens": 32},
    "preempt_recompute": {"num_blocks_override": 12, "max_model_len": 128, "max_num_batched_tokens": 64},
    "preempt_swap": {"num_blocks_override": 12, "max_model_len": 128, "max_num_batched_tokens": 64, "preemption_mode": "swap", "swap_space_gib": 0.01},
    "block_size_8": {"block_size": 8},
}


@pytest.fixture(scope="module")
def reference_outputs(model_dir):
    """Each request run alone on a roomy engine."""
    llm = _make_llm(model_dir)
    prompts = _prompts(16, seed=7)
    return prompts, [llm.generate([p], _mixed_params(i))[0].outputs[0].token_ids for i, p in enumerate(prompts)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_outputs_equal_outputs_alone(model_dir, reference_outputs, name):
    prompts, expected = reference_outputs
    shared_prefix = prompts[0][:40]
    llm = _make_llm(model_dir, **CONFIGS[name])
    outputs = llm.generate(prompts, [_mixed_params(i) for i in range(len(prompts))])
    assert [o.outputs[0].token_ids for o in outputs] == expected
    if name.startswith("preempt"):
        assert llm.engine.scheduler.num_preemptions > 0
    # a second round hits the prefix cache (when on) and still agrees
    again = llm.generate([shared_prefix + [5, 6, 7]] * 2, _greedy())
    assert again[0].outputs[0].token_ids == again[1].outputs[0].token_ids
    _assert_no_leak(llm)


def test_prefix_cache_hits_are_reported(model_dir):
    llm = _make_llm(model_dir)
    prompt = _prompts(1, seed=11)[0] + list(range(10, 60))
    llm.generate([prompt], _greedy(max_tokens=2))
    (second,) = llm.generate([prompt], _greedy(max_tokens=2))
    assert second.num_cached_tokens >= 16 * ((len(prompt) - 1) // 16) > 0
    _assert_no_leak(llm)


def test_n_choices_and_seeds(model_dir):
    llm = _make_llm(model_dir)
    prompt = _prompts(1, seed=5)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    _assert_no_leak(llm)


def test_prompt_longer_than_the_context_is_rejected_unless_truncated(model_dir):
    llm = _make_llm(model_dir, max_model_len=64)
    with pytest.raises(ContextLengthError, match="64"):
        llm.generate([[5] * 70], _greedy())
    with pytest.raises(ContextLengthError, match="max_tokens|completion"):
        llm.generate([[5] * 60], _greedy(max_tokens=10))
    (output,) = llm.generate([[5] * 70], _greedy(max_tokens=4, truncate_prompt_tokens=50))
    assert len(output.prompt_token_ids) == 50 and len(output.outputs[0].token_ids) == 4
    _assert_no_leak(llm)


def test_abort_frees_blocks_at_once(model_dir):
    llm = _make_llm(model_dir)
    from tessera.core.engine.input_processor import EngineCoreRequest

    for i, prompt in enumerate(_prompts(4, seed=9)):
        llm.engine.add_request(EngineCoreRequest(f"a{i}", prompt, _greedy(max_tokens=50), 50))
    llm.engine.step()
    llm.engine.step()
    assert llm.engine.kv_cache_manager.num_used_blocks > 0
    llm.engine.abort_requests([f"a{i}" for i in range(4)])
    assert llm.engine.kv_cache_manager.num_used_blocks == 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.engine.runner.requests == {}


def test_beam_search_matches_transformers(model_dir, hf_model):
    llm = _make_llm(model_dir)
    prompt = _prompts(1, seed=21)[0]
    params = SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0.0, max_tokens=6, ignore_eos=True)
    (output,) = llm.generate([prompt], params)
    expected = hf_model.generate(
        torch.tensor([prompt]), num_beams=4, num_return_sequences=2, max_new_tokens=6, do_sample=False,
        early_stopping=False, length_penalty=1.0, eos_token_id=None, pad_token_id=0,
    )[:, len(prompt) :].tolist()
    assert [c.token_ids for c in output.outputs] == expected
    assert output.outputs[0].cumulative_logprob >= output.outputs[1].cumulative_logprob
    _assert_no_leak(llm)


def test_beam_width_one_is_greedy(model_dir):
    llm = _make_llm(model_dir)
    prompt = _prompts(1, seed=22)[0]
    (beam,) = llm.generate([prompt], SamplingParams(use_beam_search=True, temperature=0.0, max_tokens=8, ignore_eos=True))
    (greedy,) = llm.generate([prompt], _greedy(max_tokens=8))
    assert beam.outputs[0].token_ids == greedy.outputs[0].token_ids
