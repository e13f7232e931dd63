"""The scheduler: each step, which requests compute how many tokens, within the token budget."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from tessera.core.config import SchedulerConfig
from tessera.core.engine.kv_cache import KVCacheManager
from tessera.core.engine.request import Request, RequestStatus
from tessera.core.engine.types import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from tessera.core.errors import ContextLengthError, InvalidRequestError, QueueFullError

logger = logging.getLogger(__name__)


class _Step:
    """What one schedule() call has decided so far."""

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.num_scheduled_tokens: dict[str, int] = {}
        self.new_requests: list[NewRequestData] = []
        self.cached_requests: list[CachedRequestData] = []
        self.swap_out: list[tuple[int, int]] = []
        self.swap_in: list[tuple[int, int]] = []
        self.num_preempted = 0

    def add(self, request_id: str, num_tokens: int) -> None:
        self.num_scheduled_tokens[request_id] = num_tokens
        self.token_budget -= num_tokens


class Scheduler:
    """Decides every step which requests compute which tokens; owns the request queues.

    The one rule (see Request): a scheduled request computes tokens
    [num_computed_tokens, num_computed_tokens + k). Running requests (decodes and unfinished
    chunked prefills) go first, in admission order; then waiting requests in FIFO order.
    When a running request needs a block and none is free, the most recently admitted running
    request is preempted (recompute: blocks freed, recomputed later; swap: blocks moved to swap
    space) and put at the front of the waiting queue. A step that preempts admits no one.

    A request that could not fit in the whole cache even alone is refused by add_request
    (ContextLengthError), so nothing can wait forever for blocks that never come.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        if scheduler_config.max_num_batched_tokens is None or scheduler_config.max_model_len is None:
            raise ValueError("the scheduler needs max_num_batched_tokens and max_model_len resolved (EngineCore does)")
        self.config = scheduler_config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; preemption takes from the end
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self._finished_ids: set[str] = set()  # for the next SchedulerOutput
        self._prompt_logprobs_sent: dict[str, int] = {}  # prompt positions already delivered
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises QueueFullError at the waiting-queue bound, ContextLengthError
        when it could never fit the context or the whole KV cache."""
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_waiting_requests} requests); retry later"
            )
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        max_len = self.config.max_model_len
        if not 0 < request.num_prompt_tokens < max_len:
            raise ContextLengthError(
                f"the prompt has {request.num_prompt_tokens} tokens; it must have between 1 and "
                f"{max_len - 1} (the model's maximum context length is {max_len})"
            )
        # the KV of the last sampled token is never computed, hence the - 1
        final_len = min(request.num_prompt_tokens + request.max_tokens, max_len)
        num_blocks = self.kv.num_blocks_for(final_len - 1)
        if num_blocks > self.kv.num_blocks:
            capacity = self.kv.num_blocks * self.kv.block_size
            raise ContextLengthError(
                f"the request needs up to {final_len} tokens but the KV cache holds only "
                f"{capacity}; lower max_tokens, shorten the prompt, or give the KV cache more memory"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Abort requests in any state; their blocks are freed at once."""
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (abort, a matched stop string). Unknown ids are ignored."""
        assert status.is_finished
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and release; the caller has taken it out of its queue."""
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._prompt_logprobs_sent.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def has_finished_requests(self) -> bool:
        """Finished ids not yet sent to the runner (call schedule() once more to flush them)."""
        return bool(self._finished_ids)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = _Step(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.num_preempted:  # blocks are short: admitting now would only thrash
            self._schedule_waiting(step)
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(
            new_requests=tuple(step.new_requests),
            cached_requests=tuple(step.cached_requests),
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=sum(step.num_scheduled_tokens.values()),
            finished_request_ids=finished,
            blocks_to_swap_out=tuple(step.swap_out),
            blocks_to_swap_in=tuple(step.swap_in),
        )

    def _schedule_running(self, step: _Step) -> None:
        i = 0
        while i < len(self.running) and step.token_budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, step.token_budget)
            if num_new <= 0:  # nothing to compute (the runner returned no token): skip it
                i += 1
                continue
            new_blocks = self._allocate_or_preempt(request, num_new, step)
            if new_blocks is None:  # it was the newest itself and got preempted
                break
            step.cached_requests.append(
                CachedRequestData(request.request_id, tuple(new_blocks), request.num_computed_tokens)
            )
            step.add(request.request_id, num_new)
            i += 1

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> list[int] | None:
        """Blocks for num_new more tokens, preempting the newest running requests as needed."""
        while True:
            new_blocks = self.kv.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks
            victim = self.running.pop()
            self._preempt(victim, step)
            if victim is request:
                return None

    def _preempt(self, request: Request, step: _Step) -> None:
        pairs = self.kv.swap_out(request) if self.config.preemption_mode == "swap" else None
        if pairs is not None:
            request.status = RequestStatus.SWAPPED
            step.swap_out.extend(pairs)
        else:  # recompute (or swap space full): prompt + outputs are computed again
            self.kv.free(request)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        step.num_preempted += 1
        self.waiting.appendleft(request)
        self._finished_ids.add(request.request_id)  # the runner drops it; it comes back as new
        logger.debug("preempted %s (%s)", request.request_id, request.status.name)

    def _schedule_waiting(self, step: _Step) -> None:
        while self.waiting and step.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.status == RequestStatus.SWAPPED:
                num_new = self._admit_swapped(request, step)
            else:
                num_new = self._admit(request, step)
            if num_new is None:  # FIFO: later requests do not overtake the head of the queue
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            step.new_requests.append(
                NewRequestData(
                    request_id=request.request_id,
                    token_ids=tuple(request.all_token_ids),
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling_params=request.sampling_params,
                    block_ids=tuple(self.kv.block_ids(request.request_id)),
                    num_computed_tokens=request.num_computed_tokens,
                )
            )
            step.add(request.request_id, num_new)

    def _num_to_schedule(self, num_remaining: int, budget: int) -> int | None:
        if num_remaining > budget and not self.config.enable_chunked_prefill:
            return None
        return min(num_remaining, budget)

    def _admit(self, request: Request, step: _Step) -> int | None:
        """Take prefix-cache hits and blocks for a waiting request; None if it must wait."""
        computed_blocks, num_cached = self.kv.get_computed_blocks(request)
        num_new = self._num_to_schedule(request.num_tokens - num_cached, step.token_budget)
        if num_new is None:
            return None
        if self.kv.allocate_slots(request, num_new, computed_blocks) is None:
            return None
        if request.status == RequestStatus.WAITING:  # first schedule, not a resume
            request.num_cached_tokens = num_cached
        request.num_computed_tokens = num_cached
        return num_new

    def _admit_swapped(self, request: Request, step: _Step) -> int | None:
        num_new = self._num_to_schedule(
            request.num_tokens - request.num_computed_tokens, step.token_budget
        )
        if num_new is None or not self.kv.can_swap_in(request, num_new):
            return None
        pairs = self.kv.swap_in(request)
        assert pairs is not None and self.kv.allocate_slots(request, num_new) is not None
        step.swap_in.extend(pairs)
        return num_new

    # -- results -------------------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance every scheduled request by its computed tokens and sampled token; finish the
        ones that stopped. Returns one output per request with news."""
        outputs: list[EngineCoreOutput] = []
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or aborted while the step ran
            request.num_computed_tokens += num_tokens
            self.kv.cache_computed_blocks(request, request.num_computed_tokens)
            new_token_ids: list[int] = []
            status: RequestStatus | None = None
            token = runner_output.sampled_token_ids.get(request_id)
            if token is not None:
                request.output_token_ids.append(token)
                new_token_ids.append(token)
                status = self._check_stop(request, token)
            prompt_logprobs = self._new_prompt_logprobs(request, runner_output.prompt_logprobs.get(request_id))
            if not new_token_ids and not prompt_logprobs and status is None:
                continue
            logprobs = runner_output.logprobs.get(request_id)
            outputs.append(
                EngineCoreOutput(
                    request_id=request_id,
                    new_token_ids=new_token_ids,
                    new_logprobs=[logprobs] if logprobs is not None and new_token_ids else None,
                    new_prompt_logprobs=prompt_logprobs,
                    finish_reason=status.finish_reason if status is not None else None,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=request.num_cached_tokens,
                )
            )
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
        return outputs

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        """The finished status the newly appended token leads to, or None to go on."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _new_prompt_logprobs(
        self, request: Request, entries: list[TokenLogprobs | None] | None
    ) -> list[TokenLogprobs | None] | None:
        """Drop the prompt positions already delivered (a request recomputed after preemption
        gets them computed again). Entry i scores prompt position i; after computing c tokens
        the runner has produced entries for positions [0, min(c + 1, num_prompt_tokens))."""
        if not entries:
            return None
        end = min(request.num_computed_tokens + 1, request.num_prompt_tokens)
        start = end - len(entries)
        num_sent = self._prompt_logprobs_sent.get(request.request_id, 0)
        self._prompt_logprobs_sent[request.request_id] = max(num_sent, end)
        fresh = entries[max(0, num_sent - start) :]
        return fresh or None
