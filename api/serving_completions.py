"""POST /v1/completions: prompts (text or token ids) in, completions out, whole or streamed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tessera.api.errors import error_body
from tessera.api.guided_request import constraint_param, guided_constraint
from tessera.api.logprobs import append_completion_logprobs, prompt_logprobs_json
from tessera.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from tessera.api.serving_common import (
    PromptResult,
    ServingContext,
    abort_all,
    check_prompt_ids,
    check_stream_options,
    collect,
    fit_max_tokens,
    name_guided_param,
    new_request_id,
    prepare_off_loop_if_large,
    sampling_params,
    truncate,
)
from tessera.api.streams import (
    SSE_DONE,
    ClientDisconnected,
    close_all,
    merge,
    prime,
    sse,
    until_disconnect,
)
from tessera.core.errors import InvalidRequestError, TesseraError
from tessera.core.outputs import RequestOutput

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nobody reads it; nginx's code for "client closed request"


class ServingCompletions:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def _prompts(self, request: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) of every prompt in the request."""
        raw: Any = request.prompt
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise InvalidRequestError("prompt: must not be empty", param="prompt")
        if all(isinstance(t, int) for t in raw):
            raw = [raw]
        prompts = []
        for item in raw:
            if isinstance(item, str):
                if not item:
                    raise InvalidRequestError("prompt: the prompt is empty", param="prompt")
                tokenizer = self.ctx.require_tokenizer("a text prompt")
                ids = list(tokenizer.encode(item, add_special_tokens=request.add_special_tokens))
                prompts.append((item, ids))
            else:
                prompts.append((None, list(item)))
        return prompts

    async def create(self, request: CompletionRequest, raw_request: Request | None) -> Response:
        ctx = self.ctx
        ctx.check_model(request.model)
        if request.suffix is not None:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        check_stream_options(request)
        guided = guided_constraint(request)
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            prompt_logprobs = max(request.logprobs, prompt_logprobs or 0)
        prompts, all_params = [], []
        raw = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        num_chars = sum(len(item) for item in raw if isinstance(item, str))
        for text, ids in await prepare_off_loop_if_large(num_chars, lambda: self._prompts(request)):
            ids = truncate(ids, request.truncate_prompt_tokens)
            check_prompt_ids(ctx, ids)
            max_tokens = fit_max_tokens(ctx, len(ids), request.max_tokens, "max_tokens")
            all_params.append(sampling_params(
                ctx, request, max_tokens=max_tokens, logprobs=request.logprobs,
                prompt_logprobs=prompt_logprobs, guided=guided,
            ))
            prompts.append((text, ids))

        base_id = new_request_id("cmpl")
        request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        trackers = [ctx.tracker() for _ in prompts]
        gens: list[AsyncIterator[RequestOutput]] = []
        for (text, ids), params, rid in zip(prompts, all_params, request_ids, strict=True):
            ctx.log_request(rid, text, ids, params)
            gens.append(ctx.engine.generate(ids, params, rid, prompt=text))
        echo_texts = [self._echo_text(text, ids) if request.echo else "" for text, ids in prompts]
        try:
            if request.stream:
                firsts = await until_disconnect(prime(gens), raw_request)
                stream = self._stream(request, base_id, request_ids, prompts, echo_texts, firsts, gens, trackers)
                return StreamingResponse(stream, media_type="text/event-stream")
            results = await until_disconnect(
                asyncio.gather(*(collect(g, t) for g, t in zip(gens, trackers, strict=True))), raw_request
            )
        except ClientDisconnected:
            await abort_all(ctx, request_ids, trackers)
            await close_all(gens)
            return Response(status_code=CLIENT_CLOSED)
        except BaseException as exc:
            await abort_all(ctx, request_ids, trackers, exc)
            await close_all(gens)
            name_guided_param(exc, constraint_param(request))
            raise
        return JSONResponse(self._response(request, base_id, list(results), echo_texts).model_dump())

    def _echo_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        tokenizer = self.ctx.tokenizer
        return tokenizer.decode(ids) if tokenizer is not None else ""

    def _response(
        self, request: CompletionRequest, base_id: str, results: list[PromptResult], echo_texts: list[str]
    ) -> CompletionResponse:
        ctx, n = self.ctx, request.n
        choices = []
        for i, result in enumerate(results):
            for j, choice in enumerate(result.best(n)):
                logprobs = None
                if request.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    offset = 0
                    if request.echo:
                        positions = result.prompt_logprobs or [None] * len(result.prompt_token_ids)
                        offset = append_completion_logprobs(
                            logprobs, result.prompt_token_ids, positions, request.logprobs, ctx.token_text, 0
                        )
                    append_completion_logprobs(
                        logprobs, choice.token_ids, choice.logprobs, request.logprobs, ctx.token_text, offset
                    )
                choices.append(CompletionChoice(
                    index=i * n + j,
                    text=echo_texts[i] + choice.text,
                    logprobs=logprobs,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(result.prompt_logprobs, ctx.token_text)
                    if request.prompt_logprobs is not None else None,
                ))
        num_prompt = sum(len(r.prompt_token_ids) for r in results)
        num_generated = sum(r.num_generated for r in results)
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                          total_tokens=num_prompt + num_generated)
        return CompletionResponse(id=base_id, model=ctx.model_name, choices=choices, usage=usage)

    async def _stream(
        self,
        request: CompletionRequest,
        base_id: str,
        request_ids: list[str],
        prompts: list[tuple[str | None, list[int]]],
        echo_texts: list[str],
        firsts: list[RequestOutput | None],
        gens: list[AsyncIterator[RequestOutput]],
        trackers: list[Any],
    ) -> AsyncIterator[str]:
        ctx, n = self.ctx, request.n
        created = int(time.time())
        opts = request.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        num_prompt = sum(len(ids) for _, ids in prompts)
        num_generated = 0
        offsets: dict[int, int] = {}
        is_complete = False
        try:
            async for i, output in merge(firsts, gens):
                if trackers[i] is not None:
                    trackers[i].observe(output)
                for delta in output.outputs:
                    index = i * n + delta.index
                    num_generated += len(delta.token_ids)
                    text, logprobs = delta.text, None
                    is_first = index not in offsets
                    if is_first:
                        offsets[index] = 0
                        text = echo_texts[i] + text
                    if request.logprobs is not None:
                        logprobs = CompletionLogprobs()
                        if is_first and request.echo:
                            ids = output.prompt_token_ids or prompts[i][1]
                            positions = output.prompt_logprobs or [None] * len(ids)
                            offsets[index] = append_completion_logprobs(
                                logprobs, ids, positions, request.logprobs, ctx.token_text, 0
                            )
                        offsets[index] = append_completion_logprobs(
                            logprobs, delta.token_ids, delta.logprobs or [], request.logprobs,
                            ctx.token_text, offsets[index],
                        )
                    if not text and delta.finish_reason is None and not delta.token_ids:
                        continue
                    chunk: dict[str, Any] = {
                        "id": base_id, "object": "text_completion", "created": created,
                        "model": ctx.model_name,
                        "choices": [{
                            "index": index, "text": text,
                            "logprobs": logprobs.model_dump() if logprobs is not None else None,
                            "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason,
                        }],
                    }
                    if continuous:
                        chunk["usage"] = _usage(num_prompt, num_generated)
                    yield sse(chunk)
            if include_usage:
                yield sse({
                    "id": base_id, "object": "text_completion", "created": created,
                    "model": ctx.model_name, "choices": [], "usage": _usage(num_prompt, num_generated),
                })
            is_complete = True
        except TesseraError as exc:
            yield sse(error_body(exc.message, status=exc.http_status, error_type=exc.error_type, param=exc.param))
        except Exception as exc:
            logger.exception("completion stream %s failed", base_id)
            yield sse(error_body(f"Internal server error: {type(exc).__name__}", status=500))
        finally:
            if not is_complete:
                await abort_all(ctx, request_ids, trackers)
                await close_all(gens)
        yield SSE_DONE


def _usage(num_prompt: int, num_generated: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated}
