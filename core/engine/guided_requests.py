"""The engine core's guided-decoding component: compile waits, per-step bitmasks, token advance."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from tessera.core.config import DecodingConfig
from tessera.core.engine.input_processor import EngineCoreRequest
from tessera.core.engine.structured_output import StructuredOutputManager
from tessera.core.engine.types import EngineCoreOutput, SchedulerOutput
from tessera.core.plugins import PluginSet

logger = logging.getLogger(__name__)


class GuidedRequests:
    """Holds constrained requests until their grammar compiles (the step loop never waits for a
    compile), fills the token bitmask of those that sample each step, and advances their
    grammars with the sampled tokens."""

    def __init__(self, manager: StructuredOutputManager) -> None:
        self.manager = manager
        self._compiling: dict[str, EngineCoreRequest] = {}

    @classmethod
    def create(cls, config: DecodingConfig, plugins: PluginSet, tokenizer: Any, vocab_size: int) -> GuidedRequests | None:
        registry = plugins.guided_decoding_backends
        if tokenizer is None or not registry.names():
            return None
        return cls(StructuredOutputManager(registry, tokenizer, vocab_size, config.guided_decoding_backend))

    def validate(self, constraint: Any) -> str:
        return self.manager.validate(constraint)

    def submit(self, request: EngineCoreRequest) -> None:
        assert request.sampling_params.guided is not None
        self.manager.submit(request.request_id, request.sampling_params.guided)
        self._compiling[request.request_id] = request

    def has_pending(self) -> bool:
        return bool(self._compiling)

    def take_compiled(self) -> tuple[list[EngineCoreRequest], list[EngineCoreOutput]]:
        """Requests whose grammar is ready, and finished outputs for those whose compile failed."""
        ready, failed = [], []
        for request_id in [r for r in self._compiling if self.manager.is_ready(r)]:
            request = self._compiling.pop(request_id)
            error = self.manager.compile_error(request_id)
            if error is None:
                ready.append(request)
            else:
                self.manager.remove(request_id)
                failed.append(EngineCoreOutput(request_id, [], finish_reason="abort", stop_reason=error))
        return ready, failed

    def add_bitmask(self, out: SchedulerOutput, scheduler: Any) -> SchedulerOutput:
        """The bitmask rows of the constrained requests that sample in this step."""
        sampling = []
        for request_id, num_tokens in out.num_scheduled_tokens.items():
            if not self.manager.has_request(request_id):
                continue
            request = scheduler.get_request(request_id)
            if request is not None and request.num_computed_tokens + num_tokens >= request.num_tokens:
                sampling.append(request_id)
        if not sampling:
            return out
        bitmask, rows = self.manager.grammar_bitmask(sampling)
        return dataclasses.replace(out, grammar_bitmask=bitmask, structured_output_rows=rows)

    def advance(self, outputs: list[EngineCoreOutput]) -> tuple[list[str], list[str]]:
        """Feed sampled tokens to the grammars. Returns (broken, complete): requests whose token
        broke the grammar (finished as aborted rather than allowed to emit unconstrained text),
        and requests whose grammar has ended but that did not stop, as with `ignore_eos` or
        `min_tokens` (finished as stopped: nothing may follow a complete constraint)."""
        broken, complete = [], []
        for output in outputs:
            if not self.manager.has_request(output.request_id):
                continue
            for token_id in output.new_token_ids:
                if not self.manager.accept_token(output.request_id, token_id):
                    broken.append(output.request_id)
                    output.finish_reason, output.stop_reason = "abort", "token outside the grammar"
                    break
            if not output.finished and self.manager.is_terminated(output.request_id):
                complete.append(output.request_id)
                output.finish_reason = "stop"
            if output.finished:
                self.manager.remove(output.request_id)
        return broken, complete

    def remove(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._compiling.pop(request_id, None)
            if self.manager.has_request(request_id):
                self.manager.remove(request_id)
