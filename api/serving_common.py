"""What completions and chat share: the serving context, prompt checks, SamplingParams, streams."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from tessera.api.metrics import RequestTracker, ServerMetrics
from tessera.api.protocol import SamplingExtras
from tessera.core.engine.client import EngineClient
from tessera.core.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    TesseraError,
)
from tessera.core.interfaces.guided import GuidedConstraint
from tessera.core.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tessera.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ServingContext:
    """Everything an endpoint needs besides the request: built once per app."""

    engine: EngineClient
    served_model_names: list[str]
    max_logprobs: int = 20
    return_tokens_as_token_ids: bool = False
    metrics: ServerMetrics | None = None
    log_requests: bool = True
    max_log_len: int | None = None
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_info(self) -> Any:
        return self.engine.model_info

    @property
    def tokenizer(self) -> Any:
        return self.engine.model_info.tokenizer

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist; this server serves {self.served_model_names}",
                param="model",
            )

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{what} needs a tokenizer, and this server runs with --skip-tokenizer-init", param="prompt"
            )
        return self.tokenizer

    def token_text(self, token_id: int) -> str:
        """A token as logprobs show it: its decoded text, or "token_id:N" with the flag."""
        if self.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        text = self._token_text.get(token_id)
        if text is None:
            tokenizer = self.tokenizer
            text = tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"
            self._token_text[token_id] = text
        return text

    def tracker(self) -> RequestTracker | None:
        return self.metrics.tracker() if self.metrics is not None else None

    def log_request(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> None:
        if not self.log_requests:
            return
        limit = self.max_log_len
        shown_prompt = prompt[:limit] if (prompt is not None and limit is not None) else prompt
        shown_ids = prompt_ids[:limit] if limit is not None else prompt_ids
        logger.info("request %s: prompt=%r prompt_token_ids=%s params=%s", request_id, shown_prompt, shown_ids, params)


# Prompt text past this many characters is tokenized on a worker thread. Tokenizing runs on the
# event loop otherwise, and a 10 MB prompt held every other stream for 6 s (docs/server.md); the
# tokenizers library releases the GIL while it encodes, so a thread keeps the streams flowing.
# Below it a thread's hand-off would cost more than the encoding (~1 ms at 32k characters).
OFF_LOOP_PROMPT_CHARS = 32_768


async def prepare_off_loop_if_large(num_chars: int, prepare: Callable[[], T]) -> T:
    """`prepare()` (tokenizing a prompt, rendering a chat) on a worker thread when its text is
    long, inline otherwise."""
    if num_chars > OFF_LOOP_PROMPT_CHARS:
        return await anyio.to_thread.run_sync(prepare)
    return prepare()


def messages_chars(messages: list[dict[str, Any]]) -> int:
    """The characters of text in chat messages (string contents and text parts)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return total


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_prompt_ids(ctx: ServingContext, prompt_ids: list[int], param: str = "prompt") -> None:
    if not prompt_ids:
        raise InvalidRequestError(f"{param}: the prompt is empty", param=param)
    vocab_size = ctx.model_info.vocab_size
    for token_id in prompt_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"{param}: token id {token_id} is outside the vocabulary (0..{vocab_size - 1})", param=param
            )


def truncate(prompt_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
    if truncate_prompt_tokens is None:
        return prompt_ids
    if truncate_prompt_tokens < 1:
        raise InvalidRequestError(
            f"truncate_prompt_tokens: must be >= 1, got {truncate_prompt_tokens}", param="truncate_prompt_tokens"
        )
    return prompt_ids[-truncate_prompt_tokens:]


def fit_max_tokens(ctx: ServingContext, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
    """The token budget: the requested one if the context has room (else 400 with both numbers)."""
    max_model_len = ctx.model_info.max_model_len
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"{param}: must be at least 1, got {max_tokens}", param=param)
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens, leaving no room to generate. Shorten the prompt.",
            param="messages" if param == "max_completion_tokens" else "prompt",
        )
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} "
            f"for the completion). Reduce the prompt or {param}.",
            param=param,
        )
    return max_tokens


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, bias in raw.items():
        try:
            out[int(key)] = float(bias)
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    return out


def sampling_params(
    ctx: ServingContext,
    request: SamplingExtras,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
    guided: GuidedConstraint | None,
) -> SamplingParams:
    """The request's SamplingParams, validated (a bad value is a 400 naming the parameter)."""
    stop = request.stop
    params = SamplingParams(
        n=request.n,
        best_of=request.best_of,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=-1 if request.top_k is None else request.top_k,
        min_p=0.0 if request.min_p is None else request.min_p,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        logit_bias=_logit_bias(request.logit_bias),
        allowed_token_ids=request.allowed_token_ids,
        seed=request.seed,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        stop_token_ids=list(request.stop_token_ids or []),
        include_stop_str_in_output=request.include_stop_str_in_output,
        ignore_eos=request.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        truncate_prompt_tokens=request.truncate_prompt_tokens,
        use_beam_search=request.use_beam_search,
        length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
        guided=guided,
        eos_token_ids=tuple(ctx.model_info.eos_token_ids),
    )
    params.validate(vocab_size=ctx.model_info.vocab_size, max_logprobs=ctx.max_logprobs)
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        raise InvalidRequestError(f"seed: must fit in 64 bits, got {params.seed}", param="seed")
    if request.stream and params.best_of is not None and params.best_of > params.n:
        raise InvalidRequestError("best_of > n is not supported when streaming", param="best_of")
    return params


def check_stream_options(request: SamplingExtras) -> None:
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError("stream_options can only be set when stream is true", param="stream_options")


# ---------------------------------------------------------------- results


@dataclass
class ChoiceState:
    """One choice accumulated from deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


@dataclass
class PromptResult:
    """One engine request accumulated: its prompt and its choices."""

    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    choices: dict[int, ChoiceState] = field(default_factory=dict)

    def add(self, output: RequestOutput) -> None:
        if output.prompt_token_ids:
            self.prompt_token_ids = list(output.prompt_token_ids)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        for delta in output.outputs:
            self.choices.setdefault(delta.index, ChoiceState(delta.index)).add(delta)

    def best(self, n: int) -> list[ChoiceState]:
        """The n returned choices (best_of > n keeps the n most likely), re-indexed 0..n-1."""
        choices = [self.choices[i] for i in sorted(self.choices)]
        if len(choices) > n:
            choices = sorted(choices, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[:n]
        return choices

    @property
    def num_generated(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())


async def collect(gen: AsyncIterator[RequestOutput], tracker: RequestTracker | None) -> PromptResult:
    result = PromptResult()
    async for output in gen:
        if tracker is not None:
            tracker.observe(output)
        result.add(output)
    return result


async def abort_all(
    ctx: ServingContext, request_ids: list[str], trackers: list[RequestTracker | None],
    error: BaseException | None = None,
) -> None:
    """Abort requests even while the calling task is being cancelled (client gone). Requests the
    engine refused (`error` is a TesseraError) never ran, so they are not counted as aborted."""
    with anyio.CancelScope(shield=True):
        for request_id in request_ids:
            with contextlib.suppress(Exception):
                await ctx.engine.abort(request_id)
    if isinstance(error, TesseraError):
        return
    for tracker in trackers:
        if tracker is not None:
            tracker.record(aborted=True)


def name_guided_param(exc: BaseException, param: str | None) -> None:
    """An engine rejection of a constraint names the request parameter that carried it."""
    if param is None or not isinstance(exc, InvalidRequestError):
        return
    if exc.param in (None, "guided", "guided_decoding"):  # a backend error keeps its own name
        exc.param = param
        if param not in exc.message:
            exc.message = f"{param}: {exc.message}"
            exc.args = (exc.message,)
