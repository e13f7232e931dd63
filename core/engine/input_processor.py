"""Frontend validation of one request: prompt, context length, parameters; fan-out into sequences."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tessera.core.engine.client import ModelInfo
from tessera.core.errors import ContextLengthError, InvalidRequestError
from tessera.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineCoreRequest:
    """One sequence as sent to the engine core (picklable: it crosses the process boundary)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)


class InputProcessor:
    """Checks requests against the model before they reach the engine core."""

    def __init__(self, model_info: ModelInfo, max_logprobs: int, guided_validator=None) -> None:
        self.model_info = model_info
        self.max_logprobs = max_logprobs
        # callable(GuidedConstraint) -> None, raising InvalidRequestError; None = no backends
        self.guided_validator = guided_validator

    def process(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, child_ids: list[str]
    ) -> tuple[list[int], list[EngineCoreRequest]]:
        """Validate; returns the (possibly truncated) prompt and one core request per child."""
        info = self.model_info
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: send at least one token", param="prompt")
        if params.truncate_prompt_tokens is not None:
            prompt_token_ids = prompt_token_ids[-params.truncate_prompt_tokens :]
        bad = next((t for t in prompt_token_ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the vocabulary (0..{info.vocab_size - 1})", param="prompt"
            )
        params.validate(vocab_size=info.vocab_size, max_logprobs=self.max_logprobs)
        if params.guided is not None:
            if self.guided_validator is None:
                raise InvalidRequestError(
                    "guided decoding is not available: no guided-decoding backend is installed",
                    param="guided_decoding_backend",
                )
            self.guided_validator(params.guided)
        max_tokens = self._resolve_max_tokens(len(prompt_token_ids), params)
        params.eos_token_ids = info.eos_token_ids
        children = []
        for i, child_id in enumerate(child_ids):
            child = params.clone(
                n=1,
                best_of=1,
                seed=None if params.seed is None else params.seed + i,
                logprobs=self._child_logprobs(params),
            )
            children.append(EngineCoreRequest(child_id, list(prompt_token_ids), child, max_tokens))
        return prompt_token_ids, children

    def _resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        limit = self.model_info.max_model_len
        if num_prompt_tokens >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens, leaving no room for the completion. Please shorten the prompt.",
                param="prompt",
            )
        if params.max_tokens is None:
            return limit - num_prompt_tokens
        if num_prompt_tokens + params.max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + params.max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        return params.max_tokens

    @staticmethod
    def _child_logprobs(params: SamplingParams) -> int | None:
        assert params.best_of is not None
        if params.best_of > params.n and params.logprobs is None:
            return 0  # best-of ranks candidates by cumulative logprob
        return params.logprobs
