"""The engine core: owns scheduler, KV cache and model runner, and runs one step at a time."""

from __future__ import annotations

import dataclasses
import logging
import time

from tessera.core.config import EngineConfig
from tessera.core.engine.client import EngineStats, ModelInfo
from tessera.core.engine.guided_requests import GuidedRequests
from tessera.core.engine.input_processor import EngineCoreRequest
from tessera.core.engine.kv_cache import KVCacheManager
from tessera.core.engine.request import Request, RequestStatus
from tessera.core.engine.scheduler import Scheduler
from tessera.core.engine.types import EngineCoreOutput
from tessera.core.errors import ConfigError, InvalidRequestError, TesseraError
from tessera.core.plugins import PluginSet, get_plugins

logger = logging.getLogger(__name__)

_STALL_SECONDS = 120.0  # pending work with no finished step for this long = stuck


class EngineCore:
    """Loads the model, sizes the KV cache, and steps: schedule -> execute -> update."""

    def __init__(self, config: EngineConfig, plugins: PluginSet | None = None) -> None:
        from tessera.core.worker.compilation import compile_wanted
        from tessera.core.worker.model_loader import load_model
        from tessera.core.worker.model_runner import ModelRunner
        from tessera.core.worker.platform_select import select_platform

        plugins = plugins or get_plugins()
        self.config = config
        self.platform = select_platform(config.device, plugins)
        self.platform.set_seed(config.model.seed)
        loaded = load_model(config.model, config.load, self.platform, plugins)
        self.loaded = loaded
        num_blocks, num_swap_blocks = self._size_kv_cache(loaded)
        scheduler_config = self._scheduler_config(loaded.max_model_len)
        self.kv_cache_manager = KVCacheManager(config.cache, num_blocks, num_swap_blocks)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache_manager)
        self.runner = ModelRunner(
            loaded, config.cache.block_size, num_blocks, num_swap_blocks,
            compile_model=compile_wanted(config.model.enforce_eager, loaded.device),
        )
        self.model_info = ModelInfo(
            model_path=loaded.model_path,
            max_model_len=loaded.max_model_len,
            vocab_size=loaded.vocab_size,
            tokenizer=loaded.tokenizer,
            chat_template=loaded.chat_template,
            eos_token_ids=tuple(loaded.eos_token_ids),
            dtype=str(loaded.dtype).removeprefix("torch."),
        )
        self.guided = GuidedRequests.create(config.decoding, plugins, loaded.tokenizer, loaded.vocab_size)
        self.num_steps = 0
        self.last_step_time = time.monotonic()
        self.platform.release_host_memory()
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens (%d swap blocks), max_model_len %d, up to %d tokens a step",
            loaded.model_path, num_blocks, config.cache.block_size, num_swap_blocks, loaded.max_model_len,
            scheduler_config.max_num_batched_tokens,
        )

    def _size_kv_cache(self, loaded) -> tuple[int, int]:
        cache = self.config.cache
        num_layers, num_kv_heads, head_dim = loaded.model.kv_cache_spec()
        element_size = loaded.dtype.itemsize if hasattr(loaded.dtype, "itemsize") else 4
        bytes_per_block = 2 * num_layers * cache.block_size * num_kv_heads * head_dim * element_size
        if cache.num_blocks_override is not None:
            num_blocks = cache.num_blocks_override
        else:
            full_length_bytes = -(-loaded.max_model_len // cache.block_size) * bytes_per_block
            budget = self.platform.kv_cache_memory_bytes(cache, min_bytes=full_length_bytes)
            num_blocks = max(1, budget // bytes_per_block)
        if num_blocks * cache.block_size < loaded.max_model_len:
            raise ConfigError(
                f"the KV cache holds {num_blocks * cache.block_size} tokens ({num_blocks} blocks), fewer "
                f"than max_model_len ({loaded.max_model_len}): raise --kv-cache-space / "
                "--num-gpu-blocks-override or lower --max-model-len",
                param="max_model_len",
            )
        num_swap_blocks = 0
        if self.config.scheduler.preemption_mode == "swap":
            num_swap_blocks = int(cache.swap_space_gib * (1 << 30)) // bytes_per_block
        return int(num_blocks), num_swap_blocks

    def _scheduler_config(self, max_model_len: int):
        sched = self.config.scheduler
        budget = sched.max_num_batched_tokens
        if budget is None:
            budget = self.platform.default_max_num_batched_tokens
            if not sched.enable_chunked_prefill:  # a whole prompt must fit in one step
                budget = max(budget, max_model_len)
        elif not sched.enable_chunked_prefill and budget < max_model_len:
            # a value the user set is never raised behind their back
            raise ConfigError(
                f"max_num_batched_tokens={budget} is below max_model_len ({max_model_len}): without chunked "
                "prefill a whole prompt must fit in one step; raise it, lower --max-model-len or enable "
                "chunked prefill",
                param="max_num_batched_tokens",
            )
        return dataclasses.replace(sched, max_model_len=max_model_len, max_num_batched_tokens=budget)

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> EngineCoreOutput | None:
        """Queue one sequence; a request the scheduler refuses comes back finished ("abort")."""
        try:
            self._add_request(request)
        except TesseraError as exc:
            logger.warning("request %s refused by the engine core: %s", request.request_id, exc)
            return EngineCoreOutput(request.request_id, [], finish_reason="abort", stop_reason=exc.message)
        return None

    def _add_request(self, request: EngineCoreRequest) -> None:
        if request.sampling_params.guided is not None:
            if self.guided is None:
                raise InvalidRequestError("no guided-decoding backend is installed", param="guided_decoding_backend")
            self.guided.submit(request)  # reaches the scheduler once its grammar is compiled
            return
        self._schedule_request(request)

    def _schedule_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(
            Request(
                request_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                sampling_params=request.sampling_params,
                arrival_time=request.arrival_time,
                max_tokens=request.max_tokens,
            )
        )

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)
        if self.guided is not None:
            self.guided.remove(request_ids)

    def finish_requests(self, request_ids: list[str]) -> None:
        """Finish requests the frontend stopped (a stop string matched)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)
        if self.guided is not None:
            self.guided.remove(request_ids)

    def has_unfinished_requests(self) -> bool:
        """True while a step has work, including telling the runner about finished requests."""
        return (
            self.scheduler.has_unfinished_requests()
            or self.scheduler.has_finished_requests()
            or (self.guided is not None and self.guided.has_pending())
        )

    # -- stepping -----------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        if self.guided is not None:
            ready, failed = self.guided.take_compiled()
            for request in ready:
                self._schedule_request(request)
            outputs += failed
        scheduler_output = self.scheduler.schedule()
        if self.guided is not None:
            scheduler_output = self.guided.add_bitmask(scheduler_output, self.scheduler)
            if scheduler_output.is_empty and self.guided.has_pending():
                time.sleep(0.001)  # only compiles are pending: don't spin
        runner_output = self.runner.execute(scheduler_output)
        outputs += self.scheduler.update_from_output(scheduler_output, runner_output)
        if self.guided is not None:
            broken, complete = self.guided.advance(outputs)
            if broken:
                self.scheduler.finish_requests(broken, RequestStatus.FINISHED_ABORTED)
            if complete:
                self.scheduler.finish_requests(complete, RequestStatus.FINISHED_STOPPED)
        self.num_steps += 1
        self.last_step_time = time.monotonic()
        return outputs

    def stats(self) -> EngineStats:
        kv = self.kv_cache_manager
        pending = self.scheduler.has_unfinished_requests()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_blocks=kv.num_blocks,
            num_used_blocks=kv.num_used_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            is_making_progress=not pending or time.monotonic() - self.last_step_time < _STALL_SECONDS,
            num_steps=self.num_steps,
        )
