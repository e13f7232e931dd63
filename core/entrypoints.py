"""`LLM`: the offline API for library users (generate and chat over a batch of prompts)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tessera.core.config import engine_config_from_kwargs
from tessera.core.engine.beam_search import BeamSearch
from tessera.core.engine.engine_core import EngineCore
from tessera.core.engine.input_processor import InputProcessor
from tessera.core.engine.output_processor import OutputProcessor, child_request_ids
from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.tokenizer import Tokenizer
from tessera.core.outputs import RequestOutput
from tessera.core.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs an engine in this process. Keyword arguments are EngineConfig fields
    (`dtype`, `max_model_len`, `block_size`, `max_num_seqs`, `seed`, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("max_waiting_requests", sys.maxsize)  # offline batches queue everything
        self.config = engine_config_from_kwargs(model, **kwargs)
        self.engine = EngineCore(self.config)
        self.model_info = self.engine.model_info
        guided = self.engine.guided
        self.input_processor = InputProcessor(
            self.model_info, self.config.model.max_logprobs, guided.validate if guided else None
        )
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.model_info.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams() for _ in prompt_list]
        else:
            params_list = list(sampling_params)
        if len(params_list) != len(prompt_list):
            raise ValueError("pass one SamplingParams, or one per prompt")
        output_processor = OutputProcessor(self.model_info.tokenizer)
        order: list[str] = []
        searches: dict[str, tuple[RequestOutput, BeamSearch]] = {}
        for prompt, params in zip(prompt_list, params_list):
            if params.use_beam_search:
                request_id, search = self._start_beam_search(prompt, params.clone())
                order.append(request_id)
                searches[request_id] = search
            else:
                order.append(self._add(output_processor, prompt, params.clone()))
        finished = self._run(output_processor, len(order) - len(searches), use_tqdm)
        finished.update(self._run_beam_searches(searches))
        return [finished[request_id] for request_id in order]

    def _start_beam_search(self, prompt: Prompt, params: SamplingParams) -> tuple[str, tuple[RequestOutput, BeamSearch]]:
        request_id = str(next(self._ids))
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.get_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
        token_ids, core_requests = self.input_processor.process(request_id, token_ids, params, [request_id])
        shell = RequestOutput(request_id, text, token_ids, [], finished=True)
        return request_id, (shell, BeamSearch(token_ids, params, core_requests[0].max_tokens))

    def _run_beam_searches(self, searches: dict[str, tuple[RequestOutput, BeamSearch]]) -> dict[str, RequestOutput]:
        """Run every search in lock-step: one batched generate call per round."""
        live = dict(searches)
        while live := {rid: s for rid, s in live.items() if not s[1].done}:
            rounds = [(search, seq) for _, search in live.values() for seq in search.round_requests()]
            answers = self.generate([seq for _, seq in rounds], [search.round_params() for search, _ in rounds])
            offset = 0
            for _, search in live.values():
                count = len(search.live)
                search.advance([a.outputs[0].logprobs[0] for a in answers[offset : offset + count]])
                offset += count
        results = {}
        for request_id, (shell, search) in searches.items():
            shell.outputs = search.results(self.get_tokenizer())
            results[request_id] = shell
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template (with tokenizer_mode="mistral":
        encode it with mistral-common), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        if isinstance(tokenizer, Tokenizer):  # it encodes chat itself
            if chat_template is not None:
                raise ValueError("chat_template= cannot be used with tokenizer_mode='mistral': mistral-common encodes chat")
            encoded: list[Prompt] = [tokenizer.encode_chat(conversation) for conversation in conversations]
            return self.generate(encoded, sampling_params, use_tqdm=use_tqdm)
        template = chat_template or self.model_info.chat_template
        if template is None:
            raise ValueError("this model has no chat template; pass chat_template=")
        prompts: list[Prompt] = [
            tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}),
            )
            for conversation in conversations
        ]
        # the template already holds the special tokens
        token_prompts = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)

    def _add(self, output_processor: OutputProcessor, prompt: Prompt, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.get_tokenizer().encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        assert params.best_of is not None
        child_ids = child_request_ids(request_id, params.best_of)
        token_ids, core_requests = self.input_processor.process(request_id, token_ids, params, child_ids)
        output_processor.add_request(
            request_id, text, token_ids, params, child_ids,
            stream_deltas=False, wants_logprobs=params.logprobs is not None,
        )
        for core_request in core_requests:
            refused = self.engine.add_request(core_request)
            if refused is not None:
                raise InvalidRequestError(str(refused.stop_reason), param="prompt")
        return request_id

    def _run(self, output_processor: OutputProcessor, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=total, disable=not use_tqdm, desc="generating")
        while self.engine.has_unfinished_requests():
            results, to_finish = output_processor.process(self.engine.step())
            if to_finish:
                self.engine.finish_requests(to_finish)
            for output in results:
                if output.finished:
                    finished[output.request_id] = output
                    progress.update(1)
        progress.close()
        return finished
