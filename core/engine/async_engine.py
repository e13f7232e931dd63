"""AsyncEngine: the asyncio handle the API uses; validates, tracks and streams requests."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from tessera.core.config import EngineConfig
from tessera.core.engine.beam_search import BeamSearch
from tessera.core.engine.client import EngineStats, ModelInfo
from tessera.core.engine.core_client import InprocCoreClient, MultiprocCoreClient
from tessera.core.engine.input_processor import InputProcessor
from tessera.core.engine.output_processor import OutputProcessor, child_request_ids
from tessera.core.engine.types import EngineCoreOutput
from tessera.core.errors import EngineDeadError, InvalidRequestError, QueueFullError
from tessera.core.outputs import RequestOutput
from tessera.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_STALL_SECONDS = 120.0


class AsyncEngine:
    """Implements EngineClient. The engine core runs in its own process by default
    (`use_process=False` keeps it in a thread of this process)."""

    def __init__(self, config: EngineConfig, *, use_process: bool = True, guided_validator=None) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_reason: str | None = None
        client_cls = MultiprocCoreClient if use_process else InprocCoreClient
        self._client = client_cls(config, self._on_outputs_threadsafe, self._on_dead_threadsafe)
        self.model_info: ModelInfo = self._client.model_info
        self._stats: EngineStats = self._client.initial_stats
        if guided_validator is None:
            guided_validator = _frontend_guided_validator(config, self.model_info)
        self.input_processor = InputProcessor(self.model_info, config.model.max_logprobs, guided_validator)
        self.output_processor = OutputProcessor(self.model_info.tokenizer)
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # bound on requests in flight: running slots plus the waiting queue
        self._max_in_flight = config.scheduler.max_num_seqs + config.scheduler.max_waiting_requests
        self._last_output_time = time.monotonic()

    # -- EngineClient ---------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self._loop = asyncio.get_running_loop()
        self._check_alive()
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if len(self._queues) >= self._max_in_flight:
            raise QueueFullError(
                f"the server is at capacity ({len(self._queues)} requests in flight); retry shortly"
            )
        params = dataclasses.replace(sampling_params)
        if params.use_beam_search:
            yield await self._beam_search(list(prompt_token_ids), params, request_id, prompt)
            return
        assert params.best_of is not None
        child_ids = child_request_ids(request_id, params.best_of)
        if params.guided is not None and self.input_processor.guided_validator is not None:
            # Checked on a worker thread (the check is cached, so `process` below finds it done):
            # a large JSON schema takes seconds to check, and on the event loop every stream waited.
            await asyncio.to_thread(self.input_processor.guided_validator, params.guided)
        prompt_token_ids, core_requests = self.input_processor.process(
            request_id, list(prompt_token_ids), params, child_ids
        )
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add_request(
            request_id, prompt, prompt_token_ids, params, child_ids,
            stream_deltas=True, wants_logprobs=params.logprobs is not None,
        )
        self._client.send(("add", core_requests))
        self._check_alive()  # a death noticed before the queue existed failed nobody
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def _beam_search(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None
    ) -> RequestOutput:
        """Beam search as rounds of one-token requests (their prompts share the prefix cache);
        the result comes as one final output."""
        prompt_token_ids, core_requests = self.input_processor.process(
            request_id, prompt_token_ids, params, [request_id]
        )
        search = BeamSearch(prompt_token_ids, params, core_requests[0].max_tokens)
        round_index = 0
        while not search.done:
            async def extend(i: int, sequence: list[int], round_index: int = round_index) -> dict:
                round_id = f"{request_id}@{round_index}.{i}"
                async for output in self.generate(sequence, search.round_params(), round_id):
                    if output.finished:
                        return output.outputs[0].logprobs[0]
                raise EngineDeadError("beam search round ended without output")

            answers = await asyncio.gather(*(extend(i, s) for i, s in enumerate(search.round_requests())))
            search.advance(list(answers))
            round_index += 1
        return RequestOutput(
            request_id, prompt, prompt_token_ids, search.results(self.model_info.tokenizer), finished=True
        )

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        child_ids = self.output_processor.child_ids(request_id)
        if not child_ids:
            return
        final = self.output_processor.abort(request_id)
        queue = self._queues.get(request_id)
        if self._client.is_alive():
            self._client.send(("abort", child_ids))
        if queue is not None and final is not None:
            queue.put_nowait(final)  # wakes a consumer still waiting: finish_reason "abort"

    def stats(self) -> EngineStats:
        stalled = bool(self._queues) and time.monotonic() - self._last_output_time > _STALL_SECONDS
        return dataclasses.replace(self._stats, is_making_progress=not stalled)

    async def check_health(self) -> None:
        self._check_alive()
        if not self.stats().is_making_progress:
            raise EngineDeadError("the engine has made no progress while requests are pending")

    @property
    def is_running(self) -> bool:
        return self._dead_reason is None

    async def shutdown(self) -> None:
        self._client.shutdown()
        if self._dead_reason is None:
            self._dead_reason = "the engine was shut down"
        self._fail_all(EngineDeadError(self._dead_reason))

    # -- callbacks from the client's thread -------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)

    def _on_outputs_threadsafe(self, outputs: list[EngineCoreOutput], stats: EngineStats) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._stats = stats
            return
        loop.call_soon_threadsafe(self._on_outputs, outputs, stats)

    def _on_outputs(self, outputs: list[EngineCoreOutput], stats: EngineStats) -> None:
        self._stats = stats
        self._last_output_time = time.monotonic()
        if not outputs:
            return
        results, to_finish = self.output_processor.process(outputs)
        if to_finish:
            self._client.send(("finish", to_finish))
        for result in results:
            queue = self._queues.get(result.request_id)
            if queue is not None:
                queue.put_nowait(result)

    def _on_dead_threadsafe(self, reason: str) -> None:
        logger.error("engine dead: %s", reason)
        self._dead_reason = reason
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_all, EngineDeadError(reason))

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)


def _frontend_guided_validator(config: EngineConfig, model_info: ModelInfo):
    """Checks constraints in the API process, so a bad one is a 400 before it is queued."""
    from tessera.core.engine.structured_output import StructuredOutputManager
    from tessera.core.plugins import get_plugins

    registry = get_plugins().guided_decoding_backends
    if model_info.tokenizer is None or not registry.names():
        return None
    manager = StructuredOutputManager(
        registry, model_info.tokenizer, model_info.vocab_size, config.decoding.guided_decoding_backend
    )
    return manager.validate
