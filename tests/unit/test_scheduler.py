"""Scheduler: token budget, chunked prefill, preemption, swap, stop conditions, abort.

A FakeRunner mirrors the model runner's bookkeeping and keeps a fake KV cache holding token
ids per slot: every scheduled position is written, and every position a request claims to have
computed is read back. A slot holds the whole token prefix up to its position (what real KV
depends on), so a wrong block table, num_computed_tokens, prefix hit or swap fails.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from tessera.core.config import CacheConfig, SchedulerConfig
from tessera.core.engine.kv_cache import KVCacheManager
from tessera.core.engine.request import Request, RequestStatus
from tessera.core.engine.scheduler import Scheduler
from tessera.core.engine.types import (
    EngineCoreOutput,
    ModelRunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)
from tessera.core.errors import ContextLengthError, QueueFullError
from tessera.core.sampling_params import SamplingParams

BS = 8


def default_token(request_id: str, position: int) -> int:
    """Deterministic per position, so a recomputed request samples what it would have."""
    return 1000 + position


@dataclass
class _State:
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    block_ids: list[int]
    num_computed: int


class FakeRunner:
    def __init__(self, script: dict[str, list[int]] | None = None, logprobs: bool = False) -> None:
        self.script = script or {}
        self.logprobs = logprobs
        self.states: dict[str, _State] = {}
        self.slots: dict[int, tuple[int, ...]] = {}  # device slot -> tokens its KV depends on
        self.swap: dict[int, list[tuple[int, ...] | None]] = {}  # swap block -> slot contents

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in out.finished_request_ids:
            self.states.pop(request_id, None)
        for new in out.new_requests:
            self.states[new.request_id] = _State(
                list(new.token_ids), new.num_prompt_tokens, new.sampling_params, list(new.block_ids),
                new.num_computed_tokens,
            )
        for cached in out.cached_requests:
            state = self.states[cached.request_id]
            assert state.num_computed == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
        for device, swap in out.blocks_to_swap_out:
            self.swap[swap] = [self.slots.get(device * BS + i) for i in range(BS)]
        for swap, device in out.blocks_to_swap_in:
            for i, content in enumerate(self.swap.pop(swap)):
                if content is not None:
                    self.slots[device * BS + i] = content
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs] = {}
        prompt_logprobs: dict[str, list[TokenLogprobs | None]] = {}
        for request_id, num in out.num_scheduled_tokens.items():
            entries = self._prompt_logprobs(self.states[request_id], num)
            if entries is not None:
                prompt_logprobs[request_id] = entries
            token = self._forward(request_id, num)
            if token is not None:
                sampled[request_id] = token
                if self.logprobs:
                    logprobs[request_id] = TokenLogprobs((token,), (-0.5,), (1,))
        return ModelRunnerOutput(sampled, logprobs, prompt_logprobs)

    @staticmethod
    def _prompt_logprobs(state: _State, num: int) -> list[TokenLogprobs | None] | None:
        """The model runner's convention: entry i scores prompt token i (entry 0 is None)."""
        start = state.num_computed
        if state.params.prompt_logprobs is None or start >= state.num_prompt:
            return None
        last = min(start + num, state.num_prompt - 1)
        entries: list[TokenLogprobs | None] = [None] if start == 0 else []
        entries += [TokenLogprobs((state.token_ids[p],), (-1.0,), (1,)) for p in range(start + 1, last + 1)]
        return entries

    def _forward(self, request_id: str, num: int) -> int | None:
        state = self.states[request_id]
        start, end = state.num_computed, state.num_computed + num
        assert 0 < num and end <= len(state.token_ids)
        assert len(state.block_ids) * BS >= end, "block table too short"
        for p in range(start):  # attention reads the KV of every earlier position
            slot = state.block_ids[p // BS] * BS + p % BS
            assert self.slots.get(slot) == tuple(state.token_ids[: p + 1]), f"{request_id}: wrong KV at {p}"
        for p in range(start, end):
            self.slots[state.block_ids[p // BS] * BS + p % BS] = tuple(state.token_ids[: p + 1])
        state.num_computed = end
        if end < len(state.token_ids):
            return None
        k = len(state.token_ids) - state.num_prompt  # index of the output token sampled now
        script = self.script.get(request_id, [])
        token = script[k] if k < len(script) else default_token(request_id, len(state.token_ids))
        state.token_ids.append(token)
        return token


def make_scheduler(
    num_blocks: int = 64,
    *,
    prefix: bool = True,
    swap_blocks: int = 0,
    **config: object,
) -> Scheduler:
    config.setdefault("max_model_len", 256)
    config.setdefault("max_num_batched_tokens", 2048)
    kv = KVCacheManager(CacheConfig(block_size=BS, enable_prefix_caching=prefix), num_blocks, swap_blocks)
    return Scheduler(SchedulerConfig(**config), kv)  # type: ignore[arg-type]


def add(
    sched: Scheduler,
    request_id: str,
    prompt: list[int] | int,
    max_tokens: int = 16,
    **params: object,
) -> Request:
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    request = Request(request_id, tokens, SamplingParams(max_tokens=max_tokens, **params), max_tokens=max_tokens)
    sched.add_request(request)
    return request


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = sched.schedule()
    assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
    assert len(out.num_scheduled_tokens) <= sched.config.max_num_seqs
    assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
    return out, sched.update_from_output(out, runner.execute(out))


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 1000) -> dict[str, EngineCoreOutput]:
    finished: dict[str, EngineCoreOutput] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return finished
        _, outputs = step(sched, runner)
        finished.update({o.request_id: o for o in outputs if o.finished})
    raise AssertionError("requests never finished")


# -- basic flow ------------------------------------------------------------------------------
def test_prefill_then_decode_then_finish() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    req = add(sched, "a", 10, max_tokens=3)
    out, outputs = step(sched, runner)
    (new,) = out.new_requests
    assert new.token_ids == tuple(range(1, 11)) and new.num_prompt_tokens == 10
    assert new.num_computed_tokens == 0 and len(new.block_ids) == 2
    assert out.num_scheduled_tokens == {"a": 10} and not out.cached_requests
    assert [o.new_token_ids for o in outputs] == [[1010]]
    out, outputs = step(sched, runner)
    (cached,) = out.cached_requests
    assert cached.num_computed_tokens == 10 and cached.new_block_ids == ()
    assert out.num_scheduled_tokens == {"a": 1}
    out, outputs = step(sched, runner)
    assert outputs[0].finished and outputs[0].finish_reason == "length"
    assert req.output_token_ids == [1010, 1011, 1012]
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert not sched.has_unfinished_requests() and sched.has_finished_requests()
    assert sched.kv.num_used_blocks == 0
    out = sched.schedule()
    assert out.finished_request_ids == {"a"} and out.is_empty
    assert not sched.has_finished_requests()


def test_new_block_ids_reported_when_a_decode_crosses_a_block() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    add(sched, "a", BS, max_tokens=4)
    out, _ = step(sched, runner)
    assert len(out.new_requests[0].block_ids) == 1
    out, _ = step(sched, runner)  # computes position BS: a second block
    assert len(out.cached_requests[0].new_block_ids) == 1


# -- budget, chunking, order -----------------------------------------------------------------
def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=8), FakeRunner()
    add(sched, "a", 20, max_tokens=2)
    scheduled, computed = [], []
    for _ in range(3):
        out, outputs = step(sched, runner)
        scheduled.append(out.num_scheduled_tokens["a"])
        computed.append((out.new_requests or out.cached_requests)[0].num_computed_tokens)
        if scheduled[-1] < 4:
            assert not outputs
    assert scheduled == [8, 8, 4] and computed == [0, 8, 16]
    assert outputs[0].new_token_ids == [1020]  # sampled only when the chunk reached the end


def test_without_chunking_a_prompt_that_does_not_fit_waits() -> None:
    sched = make_scheduler(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    runner = FakeRunner()
    add(sched, "a", 20)
    add(sched, "b", [7] * 20)
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 20}
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 1, "b": 20}


def test_chunking_fills_the_budget_with_the_next_prompt() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=32), FakeRunner()
    add(sched, "a", 20)
    add(sched, "b", 20)
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 20, "b": 12}


def test_running_requests_go_before_waiting_ones() -> None:
    sched, runner = make_scheduler(max_num_batched_tokens=8), FakeRunner()
    add(sched, "a", 4)
    step(sched, runner)
    add(sched, "b", 20)
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 7)]
    assert [n.request_id for n in out.new_requests] == ["b"]
    assert [c.request_id for c in out.cached_requests] == ["a"]
    out, _ = step(sched, runner)  # b's unfinished prefill is running now: after a, before none
    assert list(out.num_scheduled_tokens) == ["a", "b"]


def test_max_num_seqs() -> None:
    sched, runner = make_scheduler(max_num_seqs=2), FakeRunner()
    add(sched, "a", 4, max_tokens=2)
    add(sched, "b", 4, max_tokens=5)
    add(sched, "c", 4, max_tokens=2)
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == ["a", "b"] and sched.num_waiting == 1
    out, _ = step(sched, runner)  # a finishes here
    assert "c" not in out.num_scheduled_tokens
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == ["b", "c"] and out.finished_request_ids == {"a"}


def test_fifo_head_of_line_is_not_overtaken() -> None:
    sched, runner = make_scheduler(num_blocks=4, max_model_len=32), FakeRunner()
    add(sched, "a", 16, max_tokens=8)  # 2 blocks, growing to 3
    step(sched, runner)
    add(sched, "b", [9] * 17, max_tokens=1)  # needs 3 blocks: 1 free once a grows
    add(sched, "c", 2, max_tokens=1)  # would fit, but must not overtake b
    out, _ = step(sched, runner)
    assert list(out.num_scheduled_tokens) == ["a"]


# -- prefix caching --------------------------------------------------------------------------
def test_prefix_cache_hit_is_reported_to_runner_and_frontend() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    shared = list(range(1, 2 * BS + 1))
    add(sched, "a", shared + [90, 91], max_tokens=1)
    run_to_completion(sched, runner)
    add(sched, "b", shared + [70], max_tokens=2)
    out, outputs = step(sched, runner)
    (new,) = out.new_requests
    assert new.num_computed_tokens == 2 * BS and out.num_scheduled_tokens == {"b": 1}
    assert outputs[0].num_cached_tokens == 2 * BS
    assert sched.kv.prefix_cache_hits == 2 * BS
    run_to_completion(sched, runner)  # the runner reads the shared KV back: it must be a's
    assert sched.kv.num_used_blocks == 0


# -- preemption ------------------------------------------------------------------------------
def _fill_tiny_cache(sched: Scheduler, runner: FakeRunner) -> tuple[Request, Request]:
    """Two requests in a 4-block cache; at position 16 a needs a third block."""
    a = add(sched, "a", BS, max_tokens=12)
    b = add(sched, "b", list(range(50, 50 + BS)), max_tokens=12)
    for _ in range(9):  # the prefill, then positions 8..15 fill the second block of each
        out, _ = step(sched, runner)
        assert not out.finished_request_ids
    assert sched.kv.num_free_blocks == 0 and a.num_tokens == b.num_tokens == 17
    return a, b


def test_recompute_preemption_of_the_latest_admitted() -> None:
    sched, runner = make_scheduler(num_blocks=4, prefix=False, max_model_len=32), FakeRunner()
    a, b = _fill_tiny_cache(sched, runner)
    c = add(sched, "c", [3] * 4, max_tokens=2)  # no free block: c waits
    out, _ = step(sched, runner)
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.finished_request_ids == {"b"}  # the runner forgets b
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_output_tokens == 9 and sched.num_preemptions == 1 and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c]  # the preempted request goes to the front
    resumed = None
    while resumed is None:
        out, _ = step(sched, runner)
        resumed = next((n for n in out.new_requests if n.request_id == "b"), None)
    assert a.is_finished
    assert resumed.token_ids == tuple(b.prompt_token_ids + b.output_token_ids[:9])
    assert resumed.num_prompt_tokens == BS and resumed.num_computed_tokens == 0
    assert out.num_scheduled_tokens["b"] == 17
    run_to_completion(sched, runner)
    assert b.output_token_ids == [1000 + p for p in range(BS, BS + 12)]
    assert sched.kv.num_used_blocks == 0


def test_recompute_resume_reuses_its_own_cached_blocks() -> None:
    sched, runner = make_scheduler(num_blocks=4, max_model_len=32), FakeRunner()
    a, b = _fill_tiny_cache(sched, runner)
    out, _ = step(sched, runner)  # b is preempted; a takes b's tail block, b's head stays cached
    assert b.status == RequestStatus.PREEMPTED
    while not any(n.request_id == "b" for n in out.new_requests):
        out, _ = step(sched, runner)
    new = next(n for n in out.new_requests if n.request_id == "b")
    assert new.num_computed_tokens == BS and out.num_scheduled_tokens["b"] == 17 - BS
    assert b.num_cached_tokens == 0  # counted at the first schedule only
    run_to_completion(sched, runner)
    assert b.output_token_ids == [1000 + p for p in range(BS, BS + 12)]


def test_swap_preemption_and_swap_in() -> None:
    sched = make_scheduler(num_blocks=4, prefix=False, swap_blocks=4, max_model_len=32, preemption_mode="swap")
    runner = FakeRunner()
    a, b = _fill_tiny_cache(sched, runner)
    b_blocks = sched.kv.block_ids("b")
    out, _ = step(sched, runner)
    assert b.status == RequestStatus.SWAPPED and out.finished_request_ids == {"b"}
    assert [d for d, _ in out.blocks_to_swap_out] == b_blocks
    swap_blocks = [s for _, s in out.blocks_to_swap_out]
    assert b.num_computed_tokens == 16
    while not any(n.request_id == "b" for n in out.new_requests):
        out, _ = step(sched, runner)
    assert [s for s, _ in out.blocks_to_swap_in] == swap_blocks
    new = next(n for n in out.new_requests if n.request_id == "b")
    assert new.num_computed_tokens == 16 and out.num_scheduled_tokens["b"] == 1
    assert list(new.block_ids[:2]) == [d for _, d in out.blocks_to_swap_in]
    run_to_completion(sched, runner)  # the runner checks b's KV came back intact
    assert b.output_token_ids == [1000 + p for p in range(BS, BS + 12)]
    assert sched.kv.num_used_blocks == 0 and sched.kv.num_free_swap_blocks == 4


def test_swap_falls_back_to_recompute_when_swap_space_is_full() -> None:
    sched = make_scheduler(num_blocks=4, prefix=False, swap_blocks=1, max_model_len=32, preemption_mode="swap")
    runner = FakeRunner()
    a, b = _fill_tiny_cache(sched, runner)
    out, _ = step(sched, runner)
    assert not out.blocks_to_swap_out
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    run_to_completion(sched, runner)
    assert sched.kv.num_used_blocks == 0


# -- admission limits ------------------------------------------------------------------------
def test_queue_bound_raises_queue_full() -> None:
    sched = make_scheduler(max_waiting_requests=2)
    add(sched, "a", 4)
    add(sched, "b", 4)
    with pytest.raises(QueueFullError):
        add(sched, "c", 4)
    assert sched.num_waiting == 2


def test_request_larger_than_the_whole_cache_is_refused() -> None:
    sched = make_scheduler(num_blocks=2, max_model_len=64)
    add(sched, "ok", BS, max_tokens=BS)  # 16 tokens, the last never cached: 2 blocks
    with pytest.raises(ContextLengthError, match="KV cache"):
        add(sched, "big", BS, max_tokens=BS + 2)
    with pytest.raises(ContextLengthError):
        add(sched, "long", 64)
    assert sched.num_waiting == 1


# -- stop conditions -------------------------------------------------------------------------
def _finish_one(script: list[int], max_tokens: int = 10, max_model_len: int = 256, **params: object) -> EngineCoreOutput:
    sched, runner = make_scheduler(max_model_len=max_model_len), FakeRunner({"r": script})
    request = add(sched, "r", 4, max_tokens=max_tokens, eos_token_ids=(2,), **params)
    done = run_to_completion(sched, runner)["r"]
    assert done.new_token_ids == [request.output_token_ids[-1]]
    assert sched.kv.num_used_blocks == 0
    done.new_token_ids = request.output_token_ids  # the whole output, for the assertions
    return done


def test_stops_at_eos() -> None:
    done = _finish_one([5, 6, 2, 7])
    assert done.new_token_ids == [5, 6, 2] and done.finish_reason == "stop" and done.stop_reason is None


def test_stops_at_stop_token_ids_with_reason() -> None:
    done = _finish_one([5, 9, 6], stop_token_ids=[9])
    assert done.new_token_ids == [5, 9] and done.finish_reason == "stop" and done.stop_reason == 9


def test_min_tokens_defers_eos_and_stop_ids() -> None:
    done = _finish_one([2, 9, 2, 5], min_tokens=3, stop_token_ids=[9])
    assert done.new_token_ids == [2, 9, 2] and done.finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens() -> None:
    done = _finish_one([2, 2, 2, 2], max_tokens=4, ignore_eos=True)
    assert done.new_token_ids == [2, 2, 2, 2] and done.finish_reason == "length"


def test_max_model_len_finishes_with_length() -> None:
    done = _finish_one([5] * 20, max_tokens=20, max_model_len=10)
    assert len(done.new_token_ids) == 6 and done.finish_reason == "length"


def test_logprobs_and_prompt_logprobs_are_forwarded() -> None:
    sched, runner = make_scheduler(), FakeRunner(logprobs=True)
    add(sched, "a", 3, max_tokens=1)
    out = sched.schedule()
    ran = runner.execute(out)
    prompt_lps = [None, TokenLogprobs((2,), (-1.0,), (1,)), TokenLogprobs((3,), (-2.0,), (1,))]
    ran = ModelRunnerOutput(ran.sampled_token_ids, ran.logprobs, {"a": prompt_lps})
    (output,) = sched.update_from_output(out, ran)
    assert output.new_logprobs == [ran.logprobs["a"]]
    assert output.new_prompt_logprobs == prompt_lps


def test_prompt_logprobs_are_not_repeated_after_recompute() -> None:
    sched, runner = make_scheduler(num_blocks=4, prefix=False, max_model_len=32), FakeRunner()
    add(sched, "a", BS, max_tokens=12)
    b = add(sched, "b", list(range(50, 50 + BS)), max_tokens=12, prompt_logprobs=0)
    delivered: list[TokenLogprobs | None] = []
    outputs: list[EngineCoreOutput] = []
    while sched.has_unfinished_requests():
        _, outputs = step(sched, runner)
        delivered += [e for o in outputs if o.request_id == "b" for e in o.new_prompt_logprobs or []]
    assert b.num_preemptions == 1  # b computed its prompt twice, but each position comes once
    assert delivered[0] is None
    assert [e.token_ids[0] for e in delivered[1:] if e is not None] == b.prompt_token_ids[1:]


# -- abort / finish from outside -------------------------------------------------------------
def test_abort_waiting_request() -> None:
    sched, runner = make_scheduler(max_num_seqs=1), FakeRunner()
    add(sched, "a", 4)
    add(sched, "b", 4)
    step(sched, runner)
    sched.abort_requests(["b", "unknown"])
    assert sched.num_waiting == 0 and sched.get_request("b") is None
    out, _ = step(sched, runner)
    assert out.finished_request_ids == {"b"} and list(out.num_scheduled_tokens) == ["a"]


def test_abort_running_request_frees_blocks_at_once() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    req = add(sched, "a", 20)
    step(sched, runner)
    out = sched.schedule()
    sched.abort_requests(["a"])  # while the step runs
    assert sched.kv.num_used_blocks == 0 and req.status == RequestStatus.FINISHED_ABORTED
    assert sched.update_from_output(out, runner.execute(out)) == []
    assert req.num_output_tokens == 1
    assert sched.schedule().finished_request_ids == {"a"}
    assert not sched.has_unfinished_requests()


def test_abort_swapped_request_frees_swap_space() -> None:
    sched = make_scheduler(num_blocks=4, prefix=False, swap_blocks=4, max_model_len=32, preemption_mode="swap")
    runner = FakeRunner()
    _, b = _fill_tiny_cache(sched, runner)
    step(sched, runner)
    assert b.status == RequestStatus.SWAPPED
    sched.abort_requests(["b"])
    assert sched.kv.num_free_swap_blocks == 4
    run_to_completion(sched, runner)
    assert sched.kv.num_used_blocks == 0


def test_finish_requests_for_a_stop_string() -> None:
    sched, runner = make_scheduler(), FakeRunner()
    req = add(sched, "a", 4)
    step(sched, runner)
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert req.status.finish_reason == "stop" and sched.kv.num_used_blocks == 0
    assert sched.schedule().finished_request_ids == {"a"}


# -- everything at once ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("prefix", [True, False])
def test_random_workload_stays_consistent(mode: str, prefix: bool) -> None:
    rng = random.Random(f"{mode}{prefix}")
    sched = make_scheduler(
        num_blocks=12, prefix=prefix, swap_blocks=6, max_model_len=64, max_num_batched_tokens=24,
        max_num_seqs=5, preemption_mode=mode,
    )
    runner = FakeRunner()
    shared = [rng.randrange(1, 500) for _ in range(2 * BS)]
    expected: dict[str, int] = {}
    for i in range(40):
        prompt = shared[: rng.randrange(0, 2 * BS)] + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 20))]
        expected[f"r{i}"] = len(prompt)
        add(sched, f"r{i}", prompt, max_tokens=rng.randrange(1, 30), ignore_eos=True)
        for _ in range(rng.randrange(0, 3)):
            step(sched, runner)
        if rng.random() < 0.1:
            sched.abort_requests([f"r{rng.randrange(0, i + 1)}"])
    run_to_completion(sched, runner)
    assert sched.kv.num_used_blocks == 0 and sched.kv.num_free_swap_blocks == 6
    assert sched.num_preemptions > 0


def test_random_workload_outputs_are_exact() -> None:
    sched = make_scheduler(num_blocks=10, max_model_len=64, max_num_batched_tokens=16)
    runner = FakeRunner()
    requests = [add(sched, f"r{i}", [i + 1] * (5 + 3 * i), max_tokens=20, ignore_eos=True) for i in range(6)]
    run_to_completion(sched, runner)
    for r in requests:
        assert r.output_token_ids == [1000 + p for p in range(r.num_prompt_tokens, r.num_prompt_tokens + 20)]
    assert sched.num_preemptions > 0 and sched.kv.num_used_blocks == 0
