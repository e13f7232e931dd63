"""EngineClient: the one interface the API layer uses to talk to an engine, in-process or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from tessera.core.outputs import RequestOutput
from tessera.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and /health."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_used_blocks: int  # blocks referenced by live requests (0 when idle: the leak check)
    kv_cache_usage: float  # num_used_blocks / num_blocks
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    is_making_progress: bool  # False when work is pending but no step completed recently
    num_steps: int


@dataclass(frozen=True)
class ModelInfo:
    """What the API layer needs to know about the served model."""

    model_path: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # a transformers tokenizer or a core.interfaces.Tokenizer (None with --skip-tokenizer-init)
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    dtype: str


class EngineClient(Protocol):
    """Implemented by AsyncEngine (engine in this process) and the ZMQ client of an engine process."""

    model_info: ModelInfo

    def generate(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its progress as delta RequestOutputs (each CompletionOutput
        holds the text, token ids and logprobs new since the previous yield; finish_reason is set
        on a choice's last delta; the last yield has finished=True). Raises InvalidRequestError
        (bad parameters / context too long), QueueFullError (waiting queue full) before the first
        yield. Closing the iterator early (client gone) aborts the request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are freed at once. Unknown ids are ignored."""
        ...

    def stats(self) -> EngineStats:
        """The latest engine statistics."""
        ...

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine is dead or stuck."""
        ...

    @property
    def is_running(self) -> bool:
        """False once the engine has died or shut down."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine (and its process); pending requests finish with an abort."""
        ...
