"""A small deterministic EngineClient with a real (character-level) tokenizer, for server tests."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from tessera.core.engine.client import EngineStats, ModelInfo
from tessera.core.errors import EngineDeadError, InvalidRequestError, QueueFullError
from tessera.core.outputs import CompletionOutput, Logprob, RequestOutput
from tessera.core.sampling_params import SamplingParams

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GREEDY_TEXT = "Hello! I am a fake model."  # then EOS
SAMPLE_TEXT = "the quick brown fox jumps over the lazy dog "
BLOCK_SIZE = 16


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus ChatML's special tokens."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=chat_template,
    )


class FakeEngine:
    """Greedy requests say GREEDY_TEXT then EOS; sampled ones cycle SAMPLE_TEXT from a seeded offset."""

    def __init__(
        self,
        *,
        max_model_len: int = 512,
        chat_template: str | None = CHATML,
        token_delay: float = 0.0,
        max_waiting: int | None = None,
        model_path: str = "/models/fake-model",
    ) -> None:
        self.tokenizer = make_tokenizer(chat_template)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.model_info = ModelInfo(
            model_path=model_path, max_model_len=max_model_len, vocab_size=len(self.tokenizer),
            tokenizer=self.tokenizer, chat_template=chat_template, eos_token_ids=(self.eos_id,),
            dtype="float32",
        )
        self.token_delay = token_delay
        self.max_waiting = max_waiting
        self.live: dict[str, int] = {}  # request id -> KV blocks held
        self.aborted: list[str] = []
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.healthy = True
        self.running = True
        self.hold: asyncio.Event | None = None  # when set up, generation waits for it

    @property
    def is_running(self) -> bool:
        return self.running

    def stats(self) -> EngineStats:
        used = sum(self.live.values())
        return EngineStats(
            num_running=len(self.live), num_waiting=0, num_blocks=1000, num_used_blocks=used,
            kv_cache_usage=used / 1000, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
            is_making_progress=True, num_steps=0,
        )

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineDeadError("the fake engine is dead")

    async def abort(self, request_id: str) -> None:
        if request_id in self.live:
            self.aborted.append(request_id)
            self.live.pop(request_id, None)

    async def shutdown(self) -> None:
        self.running = False

    def _text(self, params: SamplingParams, index: int) -> tuple[str, bool]:
        """The choice's text before stops, and whether it ends with EOS."""
        if params.is_greedy:
            return GREEDY_TEXT, True
        seed = params.seed if params.seed is not None else random.randrange(1 << 30)
        start = random.Random(seed * 1000 + index).randrange(len(SAMPLE_TEXT))
        return (SAMPLE_TEXT * 40)[start:], False

    async def generate(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        params = sampling_params
        if params.guided is not None:
            raise InvalidRequestError("guided decoding is not available yet")
        if self.max_waiting is not None and len(self.live) >= self.max_waiting:
            raise QueueFullError("the waiting queue is full; retry later")
        self.requests.append((list(prompt_token_ids), params))
        self.live[request_id] = (len(prompt_token_ids) + BLOCK_SIZE - 1) // BLOCK_SIZE + 1
        try:
            if self.hold is not None:
                await self.hold.wait()
            async for output in self._run(prompt_token_ids, params, request_id, prompt):
                if output.finished:
                    self.live.pop(request_id, None)
                yield output
        finally:
            if self.live.pop(request_id, None) is not None:  # closed early: the contract's abort
                self.aborted.append(request_id)

    def _logprobs(self, token_id: int, num: int) -> dict[int, Logprob]:
        out = {token_id: Logprob(-0.25, 1, self.tokenizer.decode([token_id]))}
        for rank, other in enumerate((t for t in range(3, 3 + num + 1) if t != token_id), start=2):
            if rank > num:
                break
            out[other] = Logprob(-1.0 * rank, rank, self.tokenizer.decode([other]))
        return out

    async def _run(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None
    ) -> AsyncIterator[RequestOutput]:
        num_choices = params.n
        plans = [self._text(params, i) for i in range(num_choices)]
        texts = ["" for _ in range(num_choices)]
        counts = [0] * num_choices
        sents = [0] * num_choices
        finished: list[str | None] = [None] * num_choices
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [self._logprobs(t, params.prompt_logprobs) for t in prompt_ids[1:]]
        is_first = True
        while not all(finished):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            else:
                await asyncio.sleep(0)
            if request_id not in self.live:  # aborted
                outs = [CompletionOutput(i, "", [], finish_reason="abort") for i in range(num_choices) if not finished[i]]
                yield RequestOutput(request_id, prompt, prompt_ids, outs, finished=True)
                return
            outs = []
            for i in range(num_choices):
                if finished[i]:
                    continue
                outs.append(self._step(params, plans[i], i, texts, counts, sents, finished))
            yield RequestOutput(
                request_id, prompt, list(prompt_ids), outs, finished=all(finished),
                prompt_logprobs=prompt_logprobs if is_first else None,
            )
            is_first = False

    def _step(self, params: SamplingParams, plan: tuple[str, bool], i: int, texts: list[str],
              counts: list[int], sents: list[int], finished: list[str | None]) -> CompletionOutput:
        """One token of choice i. Text is held back while it could still be the start of a stop
        string, as the real output processor does; sents[i] counts the characters already sent."""
        source, ends_with_eos = plan
        k = counts[i]
        counts[i] += 1
        if k >= len(source) and ends_with_eos and not params.ignore_eos and k >= params.min_tokens:
            token_id, piece = self.eos_id, ""
        else:
            piece = source[k % len(source)]
            token_id = self.tokenizer.convert_tokens_to_ids(piece)
        logprobs = [self._logprobs(token_id, params.logprobs)] if params.logprobs is not None else None
        out = CompletionOutput(i, "", [token_id], cumulative_logprob=-0.25 * counts[i], logprobs=logprobs)
        sent = sents[i]
        if token_id == self.eos_id:
            out.finish_reason = "stop"
        elif token_id in params.stop_token_ids:
            out.finish_reason, out.stop_reason = "stop", token_id
        else:
            texts[i] += piece
        full = texts[i]
        for stop in params.stop:
            at = full.find(stop)
            if at >= 0 and out.finish_reason is None:
                full = full[: at + len(stop)] if params.include_stop_str_in_output else full[:at]
                out.finish_reason, out.stop_reason = "stop", stop
        if out.finish_reason is None and params.max_tokens is not None and counts[i] >= params.max_tokens:
            out.finish_reason = "length"
        if out.finish_reason is None and params.stop:
            safe = max(sent, len(full) - max(len(s) for s in params.stop) + 1)
        else:
            safe = len(full)
        out.text = full[sent:safe]
        sents[i] = safe
        finished[i] = out.finish_reason
        return out
