"""SamplingParams: how one request generates, validated so a bad value is a clear 400."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.guided import GuidedConstraint

_GREEDY_EPS = 1e-5
# The most sequences one request may ask for (n, best_of): OpenAI's own limit for n. Each is a
# request of its own in the engine, made when the request arrives.
MAX_SEQUENCES_PER_REQUEST = 128


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token (0 = only the chosen)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    guided: GuidedConstraint | None = None
    # set by the engine from the tokenizer; not user-facing
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n
        if self.top_k == 0:
            self.top_k = -1
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    def validate(self, *, vocab_size: int | None = None, max_logprobs: int | None = None) -> None:
        """Raise InvalidRequestError naming the first invalid parameter."""
        if self.n < 1:
            raise _bad("n", f"must be at least 1, got {self.n}")
        assert self.best_of is not None
        if self.n > MAX_SEQUENCES_PER_REQUEST:
            raise _bad("n", f"must be at most {MAX_SEQUENCES_PER_REQUEST}, got {self.n}")
        if self.best_of < self.n:
            raise _bad("best_of", f"must be >= n ({self.n}), got {self.best_of}")
        if self.best_of > MAX_SEQUENCES_PER_REQUEST:
            raise _bad("best_of", f"must be at most {MAX_SEQUENCES_PER_REQUEST}, got {self.best_of}")
        if self.best_of > self.n and not self.use_beam_search:
            if self.temperature < _GREEDY_EPS:
                raise _bad("best_of", "must equal n when sampling greedily (temperature 0)")
        if self.temperature < 0.0:
            raise _bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise _bad("top_k", f"must be -1 (disabled) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise _bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise _bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is None:
                continue
            if value < 0:
                raise _bad(name, f"must be >= 0, got {value}")
            if max_logprobs is not None and value > max_logprobs:
                raise _bad(name, f"{value} is above the server's --max-logprobs ({max_logprobs})")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise _bad("truncate_prompt_tokens", f"must be >= 1, got {self.truncate_prompt_tokens}")
        if any(not s for s in self.stop):
            raise _bad("stop", "stop strings must be non-empty")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not -100.0 <= bias <= 100.0:
                    raise _bad("logit_bias", f"bias for token {token_id} must be in [-100, 100], got {bias}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise _bad("allowed_token_ids", "must not be empty")
        if self.use_beam_search:
            if self.temperature > _GREEDY_EPS and self.temperature != 1.0:
                raise _bad("temperature", "beam search is deterministic; leave temperature at its default")
            if self.guided is not None:
                raise _bad("use_beam_search", "cannot be combined with guided decoding")
            width = max(self.best_of, self.n)
            if max_logprobs is not None and 2 * width > max_logprobs:
                # each round ranks 2 x width candidates per beam, read from the top logprobs
                raise _bad(
                    "best_of" if self.best_of > self.n else "n",
                    f"beam search of width {width} ranks {2 * width} candidates a step, above the server's "
                    f"--max-logprobs ({max_logprobs}); the widest it allows is {max_logprobs // 2}",
                )
        if self.early_stopping not in (True, False, "never"):
            raise _bad("early_stopping", "must be true, false or \"never\"")
        if vocab_size is not None:
            ids = list(self.stop_token_ids) + list(self.allowed_token_ids or []) + list(self.logit_bias or {})
            for token_id in ids:
                if not 0 <= token_id < vocab_size:
                    raise _bad("token ids", f"token id {token_id} is outside the vocabulary (0..{vocab_size - 1})")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def clone(self, **changes: Any) -> SamplingParams:
        from dataclasses import replace

        return replace(self, **changes)
