"""Beam search on top of the engine: each round asks for one token's top logprobs per beam."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tessera.core.outputs import CompletionOutput, PositionLogprobs
from tessera.core.sampling_params import SamplingParams


@dataclass
class Beam:
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | None = None


def _score(beam: Beam, length_penalty: float) -> float:
    """Length-normalized log-likelihood (Hugging Face's convention)."""
    return beam.cumulative_logprob / max(len(beam.token_ids), 1) ** length_penalty


class BeamSearch:
    """The bookkeeping of one beam-search request; the caller runs the model.

    Each round: `round_requests()` gives the token sequences to extend (one step each, asking
    for `num_logprobs` top logprobs), `advance()` takes the engine's answers, until `done`.
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, max_tokens: int) -> None:
        assert params.best_of is not None
        self.prompt = list(prompt_token_ids)
        self.params = params
        self.width = max(params.best_of, params.n)
        self.max_tokens = max_tokens
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(params.eos_token_ids))
        self.live: list[Beam] = [Beam()]
        self.finished: list[Beam] = []

    @property
    def num_logprobs(self) -> int:
        return 2 * self.width

    def round_requests(self) -> list[list[int]]:
        return [self.prompt + beam.token_ids for beam in self.live]

    @property
    def done(self) -> bool:
        return not self.live

    def round_params(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.num_logprobs, ignore_eos=True)

    def advance(self, answers: list[PositionLogprobs]) -> None:
        """Extend every live beam by its top candidates (one logprobs entry per live beam, in
        order) and keep the best `width` of them."""
        candidates: list[Beam] = []
        for beam, answer in zip(self.live, answers):
            for token_id, entry in answer.items():
                candidates.append(Beam(beam.token_ids + [token_id], beam.cumulative_logprob + entry.logprob))
        candidates.sort(key=lambda b: b.cumulative_logprob, reverse=True)
        live: list[Beam] = []
        for beam in candidates:
            last = beam.token_ids[-1]
            is_stop = last in self.stop_ids and len(beam.token_ids) > self.params.min_tokens
            if is_stop:
                beam.finish_reason, beam.stop_reason = "stop", last
                if len(self.finished) < self.width:
                    self.finished.append(beam)
            elif len(live) < self.width:
                if len(beam.token_ids) >= self.max_tokens:
                    beam.finish_reason = "length"
                    self.finished.append(beam)
                else:
                    live.append(beam)
        self.live = [] if self._should_stop(live) else live

    def _should_stop(self, live: list[Beam]) -> bool:
        if not live:
            return True
        early = self.params.early_stopping
        if early == "never" or len(self.finished) < self.width:
            return False
        if early is True:
            return True
        # heuristic (early_stopping=False): stop when no live beam can beat the worst kept one
        worst_finished = min(_score(b, self.params.length_penalty) for b in self.finished)
        return max(_score(b, self.params.length_penalty) for b in live) < worst_finished

    def results(self, tokenizer: Any) -> list[CompletionOutput]:
        """The n best beams, finished ones and (at the length limit) the live ones."""
        pool = self.finished + self.live
        pool.sort(key=lambda b: _score(b, self.params.length_penalty), reverse=True)
        outputs = []
        for index, beam in enumerate(pool[: self.params.n]):
            tokens = beam.token_ids
            visible = tokens[:-1] if beam.stop_reason is not None and not self.params.include_stop_str_in_output else tokens
            outputs.append(
                CompletionOutput(
                    index=index, token_ids=list(tokens),
                    text=tokenizer.decode(visible, skip_special_tokens=self.params.skip_special_tokens) if tokenizer else "",
                    cumulative_logprob=beam.cumulative_logprob,
                    finish_reason=beam.finish_reason or "length", stop_reason=beam.stop_reason,
                )
            )
        return outputs
