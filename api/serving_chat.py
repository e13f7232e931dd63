"""POST /v1/chat/completions: render the conversation, generate, answer whole or streamed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tessera.api.chat_template import (
    NO_TEMPLATE_MESSAGE,
    check_generation_flags,
    render_chat,
    special_tokens_of,
)
from tessera.api.chat_tools import ToolCallFormatter, ToolPlan, plan_tools
from tessera.api.errors import error_body
from tessera.api.guided_request import constraint_param, guided_constraint
from tessera.api.logprobs import chat_logprobs, prompt_logprobs_json
from tessera.api.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
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
    messages_chars,
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
from tessera.core.interfaces.tokenizer import Tokenizer
from tessera.core.outputs import RequestOutput
from tessera.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatSettings:
    """The server flags chat depends on."""

    chat_template: str | None = None  # resolved at startup (None: the model has none)
    response_role: str = "assistant"
    trust_request_chat_template: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


@dataclass
class RenderedChat:
    prompt: str
    prompt_ids: list[int]


def _encode_with_tokenizer(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: str | None,
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, str]] | None,
) -> RenderedChat:
    """`--tokenizer-mode mistral`: the tokenizer (mistral-common) encodes the conversation itself;
    no template is involved. The prompt always ends ready for the assistant's turn, so
    add_generation_prompt only matters together with continue_final_message."""
    if chat_template is not None:
        raise InvalidRequestError(
            "chat_template cannot be used with this server: it runs with --tokenizer-mode mistral, where "
            "mistral-common encodes chat requests itself. Remove chat_template.",
            param="chat_template",
        )
    if documents:
        raise InvalidRequestError(
            "documents are not supported with --tokenizer-mode mistral; put them in the messages",
            param="documents",
        )
    check_generation_flags(add_generation_prompt, continue_final_message)
    ids = tokenizer.encode_chat(messages, tools, continue_final_message=continue_final_message)
    return RenderedChat(tokenizer.decode(ids, skip_special_tokens=False), ids)


class ServingChat:
    def __init__(self, ctx: ServingContext, settings: ChatSettings) -> None:
        self.ctx = ctx
        self.settings = settings

    def _template(self, requested: str | None) -> str:
        if requested is not None:
            if not self.settings.trust_request_chat_template:
                raise InvalidRequestError(
                    "chat_template in the request is refused: this server does not run templates sent by "
                    "clients. Start it with --trust-request-chat-template to allow them.",
                    param="chat_template",
                )
            return requested
        if self.settings.chat_template is None:
            raise InvalidRequestError(NO_TEMPLATE_MESSAGE, param="messages")
        return self.settings.chat_template

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        add_special_tokens: bool,
        chat_template: str | None,
        chat_template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None,
        documents: list[dict[str, str]] | None,
    ) -> RenderedChat:
        """Messages -> prompt text -> token ids (shared with /tokenize)."""
        tokenizer = self.ctx.require_tokenizer("chat")
        if not messages:
            raise InvalidRequestError("messages: must contain at least one message", param="messages")
        if isinstance(tokenizer, Tokenizer):
            return _encode_with_tokenizer(
                tokenizer, messages, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
                documents=documents,
            )
        prompt = render_chat(
            self._template(chat_template), messages,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tools=tools, documents=documents, template_kwargs=chat_template_kwargs,
            special_tokens=special_tokens_of(tokenizer),
        )
        return RenderedChat(prompt, list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens)))

    def _params(self, request: ChatCompletionRequest, num_prompt_tokens: int, plan: ToolPlan) -> SamplingParams:
        num_top = request.top_logprobs
        if num_top is not None and not request.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if num_top is not None and not 0 <= num_top <= self.ctx.max_logprobs:
            raise InvalidRequestError(
                f"top_logprobs: must be in [0, {self.ctx.max_logprobs}] (the server's --max-logprobs), got {num_top}",
                param="top_logprobs",
            )
        if request.max_completion_tokens is not None:
            max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = request.max_tokens, "max_tokens"
        return sampling_params(
            self.ctx, request,
            max_tokens=fit_max_tokens(self.ctx, num_prompt_tokens, max_tokens, param),
            logprobs=(num_top or 0) if request.logprobs else None,
            prompt_logprobs=request.prompt_logprobs,
            guided=guided_constraint(request, plan.guided),
        )

    async def create(self, request: ChatCompletionRequest, raw_request: Request | None) -> Response:
        ctx, settings = self.ctx, self.settings
        ctx.check_model(request.model)
        check_stream_options(request)
        plan = plan_tools(request, enable_auto_tool_choice=settings.enable_auto_tool_choice,
                          tool_parser=settings.tool_call_parser)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        rendered = await prepare_off_loop_if_large(messages_chars(messages), lambda: self.render(
            messages, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            add_special_tokens=request.add_special_tokens, chat_template=request.chat_template,
            chat_template_kwargs=request.chat_template_kwargs, tools=plan.tools, documents=request.documents,
        ))
        prompt_ids = truncate(rendered.prompt_ids, request.truncate_prompt_tokens)
        check_prompt_ids(ctx, prompt_ids, param="messages")
        params = self._params(request, len(prompt_ids), plan)
        role = settings.response_role if request.add_generation_prompt else messages[-1]["role"]
        echo = ""
        if request.echo and messages[-1]["role"] == role and isinstance(messages[-1].get("content"), str):
            echo = messages[-1]["content"]

        request_id = new_request_id("chatcmpl")
        tracker = ctx.tracker()
        ctx.log_request(request_id, rendered.prompt, prompt_ids, params)
        gen = ctx.engine.generate(prompt_ids, params, request_id, prompt=rendered.prompt)
        try:
            if request.stream:
                firsts = await until_disconnect(prime([gen]), raw_request)
                stream = self._stream(request, request_id, role, echo, plan, firsts, gen, tracker, len(prompt_ids))
                return StreamingResponse(stream, media_type="text/event-stream")
            result = await until_disconnect(collect(gen, tracker), raw_request)
        except ClientDisconnected:
            await abort_all(ctx, [request_id], [tracker])
            await close_all([gen])
            return Response(status_code=499)
        except BaseException as exc:
            await abort_all(ctx, [request_id], [tracker], exc)
            await close_all([gen])
            name_guided_param(exc, plan.guided[0] if plan.guided else constraint_param(request))
            raise
        return JSONResponse(self._response(request, request_id, role, echo, plan, result).model_dump())

    def _response(
        self, request: ChatCompletionRequest, request_id: str, role: str, echo: str, plan: ToolPlan,
        result: PromptResult,
    ) -> ChatCompletionResponse:
        ctx = self.ctx
        choices = []
        for j, choice in enumerate(result.best(request.n)):
            formatter = plan.formatter(ctx.tokenizer)
            content, tool_calls = formatter.whole(choice.text)
            if echo and content is not None:
                content = echo + content
            logprobs = None
            if request.logprobs:
                logprobs = ChatLogprobs(content=chat_logprobs(
                    choice.token_ids, choice.logprobs, request.top_logprobs or 0, ctx.token_text))
            choices.append(ChatChoice(
                index=j,
                message=ChatMessageOut(role=role, content=content, tool_calls=tool_calls),
                logprobs=logprobs,
                finish_reason=formatter.finish_reason(choice.finish_reason, bool(tool_calls)),
                stop_reason=choice.stop_reason,
            ))
        num_prompt, num_generated = len(result.prompt_token_ids), result.num_generated
        return ChatCompletionResponse(
            id=request_id, model=ctx.model_name, choices=choices,
            usage=UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                            total_tokens=num_prompt + num_generated),
            prompt_logprobs=prompt_logprobs_json(result.prompt_logprobs, ctx.token_text)
            if request.prompt_logprobs is not None else None,
        )

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, role: str, echo: str, plan: ToolPlan,
        firsts: list[RequestOutput | None], gen: AsyncIterator[RequestOutput], tracker: Any, num_prompt: int,
    ) -> AsyncIterator[str]:
        ctx = self.ctx
        created = int(time.time())
        opts = request.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        num_generated = 0
        formatters: dict[int, ToolCallFormatter] = {}

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None,
                  stop_reason: Any = None) -> str:
            body: dict[str, Any] = {
                "id": request_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                             "stop_reason": stop_reason}],
            }
            if continuous:
                body["usage"] = _usage(num_prompt, num_generated)
            return sse(body)

        is_complete = False
        try:
            for index in range(request.n):
                formatters[index] = plan.formatter(ctx.tokenizer)
                yield chunk(index, {"role": role, "content": ""})
                if echo:
                    yield chunk(index, {"content": echo})
            async for _, output in merge(firsts, [gen]):
                if tracker is not None:
                    tracker.observe(output)
                for delta in output.outputs:
                    num_generated += len(delta.token_ids)
                    formatter = formatters.setdefault(delta.index, plan.formatter(ctx.tokenizer))
                    fields = formatter.delta(delta.text)
                    if delta.finish_reason is not None:
                        fields = _join(fields, formatter.flush())
                    logprobs = None
                    if request.logprobs and delta.token_ids:
                        logprobs = {"content": [lp.model_dump() for lp in chat_logprobs(
                            delta.token_ids, delta.logprobs or [], request.top_logprobs or 0, ctx.token_text)]}
                    if not fields and logprobs is None and delta.finish_reason is None:
                        continue
                    finish = formatter.finish_reason(delta.finish_reason, formatter.has_called)
                    yield chunk(delta.index, fields, logprobs, finish, delta.stop_reason)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": ctx.model_name, "choices": [], "usage": _usage(num_prompt, num_generated)})
            is_complete = True
        except TesseraError as exc:
            yield sse(error_body(exc.message, status=exc.http_status, error_type=exc.error_type, param=exc.param))
        except Exception as exc:
            logger.exception("chat stream %s failed", request_id)
            yield sse(error_body(f"Internal server error: {type(exc).__name__}", status=500))
        finally:
            if not is_complete:
                await abort_all(ctx, [request_id], [tracker])
                await close_all([gen])
        yield SSE_DONE


def _join(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    out = dict(first)
    if "content" in second:
        out["content"] = out.get("content", "") + second["content"]
    if "tool_calls" in second:
        out["tool_calls"] = out.get("tool_calls", []) + second["tool_calls"]
    return out


def _usage(num_prompt: int, num_generated: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated}
