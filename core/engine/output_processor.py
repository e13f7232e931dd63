"""Frontend side of the engine: detokenize, apply stop strings, fan n choices in, build RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tessera.core.engine.detokenizer import IncrementalDetokenizer, TokenTextCache
from tessera.core.engine.types import EngineCoreOutput, TokenLogprobs
from tessera.core.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tessera.core.sampling_params import SamplingParams


@dataclass
class _Choice:
    index: int
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    is_final_delta_sent: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Tracker:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: dict[str, _Choice]  # child request id -> choice
    stream_deltas: bool
    wants_logprobs: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices.values())


def child_request_ids(request_id: str, num_children: int) -> list[str]:
    """Engine-core ids of a request's sequences (one per choice, best_of of them)."""
    return [request_id] if num_children == 1 else [f"{request_id}#{i}" for i in range(num_children)]


class OutputProcessor:
    """Tracks every live request of one frontend; not thread-safe (one event loop owns it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_text = TokenTextCache(tokenizer)
        self.trackers: dict[str, _Tracker] = {}
        self.parent_of: dict[str, str] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
        params: SamplingParams, child_ids: list[str], stream_deltas: bool, wants_logprobs: bool,
    ) -> None:
        def detokenizer() -> IncrementalDetokenizer | None:
            if self.tokenizer is None:
                return None
            return IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)

        choices = {cid: _Choice(i, detokenizer()) for i, cid in enumerate(child_ids)}
        self.trackers[request_id] = _Tracker(
            request_id, prompt, prompt_token_ids, params, choices, stream_deltas, wants_logprobs
        )
        for cid in child_ids:
            self.parent_of[cid] = request_id

    def child_ids(self, request_id: str) -> list[str]:
        tracker = self.trackers.get(request_id)
        return list(tracker.choices) if tracker else []

    def remove(self, request_id: str) -> None:
        tracker = self.trackers.pop(request_id, None)
        if tracker:
            for cid in tracker.choices:
                self.parent_of.pop(cid, None)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark every unfinished choice aborted; returns the final output (None if unknown)."""
        tracker = self.trackers.get(request_id)
        if tracker is None:
            return None
        for choice in tracker.choices.values():
            if not choice.finished:
                choice.finish_reason = "abort"
        output = self._build(tracker)
        self.remove(request_id)
        return output

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's core outputs. Returns the RequestOutputs to deliver and the child ids
        that the core must finish (a stop string matched)."""
        touched: dict[str, _Tracker] = {}
        to_finish: list[str] = []
        for out in outputs:
            parent = self.parent_of.get(out.request_id)
            if parent is None:
                continue  # already aborted on this side
            tracker = self.trackers[parent]
            choice = tracker.choices[out.request_id]
            if choice.finished:
                continue
            if out.new_prompt_logprobs is not None and choice.index == 0:
                tracker.prompt_logprobs = (tracker.prompt_logprobs or []) + [
                    self._position_logprobs(lp) if lp is not None else None for lp in out.new_prompt_logprobs
                ]
            tracker.num_cached_tokens = max(tracker.num_cached_tokens, out.num_cached_tokens)
            if self._apply(tracker, choice, out):
                to_finish.append(out.request_id)
            if out.new_token_ids and tracker.first_token_time is None:
                tracker.first_token_time = time.monotonic()
            touched[parent] = tracker
        results = []
        for request_id, tracker in touched.items():
            output = self._build(tracker)
            if output is not None:
                results.append(output)
            if tracker.finished:
                self.remove(request_id)
        return results, to_finish

    # -- one choice ---------------------------------------------------------------------------
    def _apply(self, tracker: _Tracker, choice: _Choice, out: EngineCoreOutput) -> bool:
        """Add new tokens to a choice; True if a stop string finished it here."""
        params = tracker.params
        for i, token_id in enumerate(out.new_token_ids):
            choice.token_ids.append(token_id)
            if out.new_logprobs is not None and i < len(out.new_logprobs):
                entry = out.new_logprobs[i]
                choice.cumulative_logprob += entry.logprobs[0]
                if tracker.wants_logprobs:
                    choice.logprobs.append(self._position_logprobs(entry))
            is_last = i == len(out.new_token_ids) - 1
            hide_stop_token = (
                is_last and isinstance(out.stop_reason, int) and not params.include_stop_str_in_output
            )
            if choice.detokenizer is not None and not hide_stop_token:
                previous_len = len(choice.text)
                choice.text += choice.detokenizer.step(token_id)
                if params.stop and self._check_stop_strings(choice, params, previous_len):
                    return True
        if out.finish_reason is not None:
            choice.finish_reason = out.finish_reason
            choice.stop_reason = out.stop_reason
        return False

    @staticmethod
    def _check_stop_strings(choice: _Choice, params: SamplingParams, previous_len: int) -> bool:
        longest = max(len(s) for s in params.stop)
        search_from = max(0, previous_len - longest + 1)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = choice.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        choice.text = choice.text[: at + len(stop)] if params.include_stop_str_in_output else choice.text[:at]
        choice.finish_reason = "stop"
        choice.stop_reason = stop
        return True

    def _position_logprobs(self, entry: TokenLogprobs) -> PositionLogprobs:
        result: PositionLogprobs = {}
        for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, entry.ranks):
            if token_id not in result:
                result[token_id] = Logprob(logprob, rank, self.token_text(token_id))
        return result

    # -- building outputs ---------------------------------------------------------------------
    def _holdback(self, tracker: _Tracker, choice: _Choice) -> int:
        """Characters to withhold from a stream: they may turn out to begin a stop string."""
        params = tracker.params
        if choice.finished or not params.stop or params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in params.stop) - 1

    def _build(self, tracker: _Tracker) -> RequestOutput | None:
        params = tracker.params
        assert params.best_of is not None
        if params.best_of > params.n:
            if not tracker.finished:
                return None  # best-of selection needs every candidate
            ranked = sorted(tracker.choices.values(), key=lambda c: c.cumulative_logprob, reverse=True)
            selected = ranked[: params.n]
            outputs = [self._full_output(c, i, tracker) for i, c in enumerate(selected)]
        elif tracker.stream_deltas:
            outputs = [o for c in tracker.choices.values() if (o := self._delta_output(c, tracker))]
        else:
            if not tracker.finished:
                return None
            outputs = [self._full_output(c, c.index, tracker) for c in tracker.choices.values()]
        return RequestOutput(
            request_id=tracker.request_id,
            prompt=tracker.prompt,
            prompt_token_ids=tracker.prompt_token_ids,
            outputs=outputs,
            finished=tracker.finished,
            prompt_logprobs=tracker.prompt_logprobs,
            num_cached_tokens=tracker.num_cached_tokens,
            metrics=self._metrics(tracker),
        )

    def _full_output(self, choice: _Choice, index: int, tracker: _Tracker) -> CompletionOutput:
        return CompletionOutput(
            index=index,
            text=choice.text,
            token_ids=list(choice.token_ids),
            cumulative_logprob=choice.cumulative_logprob if tracker.wants_logprobs else None,
            logprobs=list(choice.logprobs) if tracker.wants_logprobs else None,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )

    def _delta_output(self, choice: _Choice, tracker: _Tracker) -> CompletionOutput | None:
        visible = len(choice.text) - self._holdback(tracker, choice)
        new_text = choice.text[choice.num_sent_chars : max(visible, choice.num_sent_chars)]
        new_tokens = choice.token_ids[choice.num_sent_tokens :]
        owes_final_delta = choice.finished and not choice.is_final_delta_sent
        if not new_text and not new_tokens and not owes_final_delta:
            return None
        choice.num_sent_chars += len(new_text)
        start = choice.num_sent_tokens
        choice.num_sent_tokens = len(choice.token_ids)
        choice.is_final_delta_sent = choice.finished
        return CompletionOutput(
            index=choice.index,
            text=new_text,
            token_ids=new_tokens,
            cumulative_logprob=choice.cumulative_logprob if tracker.wants_logprobs else None,
            logprobs=choice.logprobs[start:] if tracker.wants_logprobs else None,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )

    @staticmethod
    def _metrics(tracker: _Tracker) -> dict[str, float]:
        metrics = {"arrival_time": tracker.arrival_time}
        if tracker.first_token_time is not None:
            metrics["first_token_time"] = tracker.first_token_time
        if tracker.finished:
            metrics["finished_time"] = time.monotonic()
        return metrics
