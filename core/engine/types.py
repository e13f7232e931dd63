"""The typed hand-offs of one engine step: scheduler -> model runner -> scheduler -> frontend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tessera.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the model runner has no state for: first scheduled, or resumed after preemption."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + outputs so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: tuple[int, ...]  # the whole block table
    num_computed_tokens: int  # tokens already in the cache (prefix-cache hits or swapped in)


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner already holds; only what changed since the previous step."""

    request_id: str
    new_block_ids: tuple[int, ...]  # appended to its block table
    num_computed_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    # request id -> tokens to compute this step; its order is the order of the batch
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # the runner drops its state for these (finished, aborted or preempted since the last step)
    finished_request_ids: frozenset[str] = frozenset()
    # (device block, swap block) pairs to copy out before / in before this step's forward
    blocks_to_swap_out: tuple[tuple[int, int], ...] = ()
    blocks_to_swap_in: tuple[tuple[int, int], ...] = ()
    # guided decoding: request id -> row of `grammar_bitmask` (int32, (rows, ceil(vocab/32)))
    structured_output_rows: dict[str, int] = field(default_factory=dict)
    grammar_bitmask: Any = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs at one position: the chosen token first, then the top-k (k may be 0)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class ModelRunnerOutput:
    # request id -> the token sampled this step (only requests whose chunk reached the end)
    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> logprobs of the prompt positions computed this step (first position: None)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """What the frontend learns about one sequence after a step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    new_prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
