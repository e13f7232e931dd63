"""The batched sampler: every transformation changes the choice exactly as documented."""

from __future__ import annotations

import pytest
import torch

from tessera.core.sampling_params import SamplingParams
from tessera.core.worker.sampler import apply_token_bitmask_, row_argmax, sample
from tessera.core.worker.sampling_batch import RequestState, build_sampling_batch

VOCAB = 50


def _state(params: SamplingParams, prompt=(1, 2, 3), outputs=()) -> RequestState:
    tokens = list(prompt) + list(outputs)
    return RequestState("r", tokens, len(prompt), params, [0], len(tokens))


def _sample(logits: torch.Tensor, params_list: list[SamplingParams], outputs=None):
    states = [_state(p, outputs=(outputs or {}).get(i, ())) for i, p in enumerate(params_list)]
    batch = build_sampling_batch(states, VOCAB, torch.device("cpu"))
    return sample(logits, batch)


def _logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax():
    logits = _logits(3)
    tokens, _ = _sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_reduce_to_argmax():
    logits = _logits(2)
    tokens, _ = _sample(logits, [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)])
    assert tokens == logits.argmax(-1).tolist()


def test_a_top_k_beyond_the_vocabulary_keeps_every_token():
    # 10**20 does not fit a tensor of int64: it killed the engine's step before it was clamped
    logits = _logits(2)
    for top_k in (VOCAB, VOCAB + 1, 10**20):
        batch = build_sampling_batch([_state(SamplingParams(temperature=1.0, top_k=top_k))] * 2, VOCAB, torch.device("cpu"))
        assert batch.top_k is not None and batch.top_k.tolist() == [VOCAB, VOCAB]
        tokens, _ = sample(logits, batch)
        assert all(0 <= t < VOCAB for t in tokens)


def test_the_bias_row_is_built_once_and_the_min_tokens_ban_does_not_stick():
    params = SamplingParams(logit_bias={5: 2.0}, min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    state = _state(params)
    first = build_sampling_batch([state], VOCAB, torch.device("cpu")).logit_bias
    assert first is not None and first[0, 5] == 2.0 and first[0, 7] == float("-inf")
    state.token_ids += [1, 2]  # min_tokens reached: the ban lifts, the bias stays
    later = build_sampling_batch([state], VOCAB, torch.device("cpu")).logit_bias
    assert later is not None and later[0, 5] == 2.0 and later[0, 7] == 0.0
    assert state.fixed_bias(VOCAB) is state.fixed_bias(VOCAB)


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 7] = 5.0
    logits[0, 8] = 4.9
    for seed in range(20):
        tokens, _ = _sample(logits, [SamplingParams(temperature=1.0, min_p=0.5, seed=seed)])
        assert tokens[0] in (7, 8)


def test_seeded_row_is_independent_of_its_batch_neighbours():
    logits = _logits(4)
    logits[3] = logits[0]
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone, _ = _sample(logits[:1], [seeded])
    batched, _ = _sample(logits, [seeded, SamplingParams(temperature=1.0), SamplingParams(temperature=0.7), seeded])
    assert batched[0] == alone[0]
    assert batched[3] == alone[0]  # same seed, same position, same logits


def test_seed_depends_on_output_position():
    flat = torch.zeros(1, VOCAB)  # uniform: the noise alone decides
    chosen = {
        _sample(flat, [SamplingParams(temperature=1.0, seed=5)], outputs={0: (9,) * k})[0][0]
        for k in range(8)
    }
    assert len(chosen) > 1


def test_logit_bias_and_allowed_token_ids():
    logits = _logits(2)
    tokens, _ = _sample(
        logits,
        [SamplingParams(temperature=0.0, logit_bias={11: 100.0}), SamplingParams(temperature=0.0, allowed_token_ids=[3, 4])],
    )
    assert tokens[0] == 11
    assert tokens[1] == (3 if logits[1, 3] > logits[1, 4] else 4)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0  # eos
    logits[0, 5] = 9.0  # a stop token
    logits[0, 6] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    params.eos_token_ids = (2,)
    tokens, _ = _sample(logits, [params], outputs={0: (1,)})
    assert tokens == [6]
    tokens, _ = _sample(logits, [params], outputs={0: (1, 1, 1)})
    assert tokens == [2]


def test_repetition_and_presence_penalties_demote_seen_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 1] = 2.0  # in the prompt
    logits[0, 20] = 1.5
    tokens, _ = _sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=2.0)])
    assert tokens == [20]  # 2.0 / 2 = 1.0 < 1.5
    logits[0, 30] = 1.9
    tokens, _ = _sample(logits, [SamplingParams(temperature=0.0, presence_penalty=1.0)], outputs={0: (30,)})
    assert tokens == [1]  # prompt tokens are not output tokens: presence only penalizes 30


def test_logprobs_have_ranks_and_top_k():
    logits = _logits(1)
    tokens, logprobs = _sample(logits, [SamplingParams(temperature=0.0, logprobs=3)])
    entry = logprobs[0]
    expected = logits.log_softmax(-1)[0]
    assert entry.token_ids[0] == tokens[0]
    assert entry.ranks[0] == 1
    assert list(entry.token_ids[1:]) == expected.topk(3).indices.tolist()
    assert torch.allclose(torch.tensor(entry.logprobs[1:]), expected.topk(3).values, atol=1e-6)


def test_bitmask_matches_a_naive_loop():
    rows, vocab = 3, 70
    logits = torch.randn(rows, vocab)
    allowed = torch.rand(rows, vocab) > 0.5
    words = (vocab + 31) // 32
    bitmask = torch.zeros(rows, words, dtype=torch.int32)
    for r in range(rows):
        for t in range(vocab):
            if allowed[r, t]:
                bitmask[r, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    masked = logits.clone()
    apply_token_bitmask_(masked, bitmask[[0, 2]], [0, 2])
    for r in (0, 2):
        assert torch.equal(torch.isinf(masked[r]), ~allowed[r])
    assert torch.equal(masked[1], logits[1])


@pytest.mark.parametrize("vocab", [5, 200, 256, 300, 32000, 50257])
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_row_argmax_is_argmax_with_first_index_ties(vocab: int, rows: int) -> None:
    values = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab + rows))
    assert torch.equal(row_argmax(values), values.argmax(dim=-1))
    if rows:
        values[:, [vocab // 3, vocab // 2, vocab - 1]] = 10.0  # ties in chunks and in the tail
        assert torch.equal(row_argmax(values), torch.full((rows,), vocab // 3))
        values[:, : vocab - 1] = float("-inf")  # only the last value (in the tail, if any) can win
        assert torch.equal(row_argmax(values), torch.full((rows,), vocab - 1))
