"""POST /tokenize and /detokenize: text or chat messages to token ids and back."""

from __future__ import annotations

from tessera.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from tessera.api.serving_chat import ServingChat
from tessera.api.serving_common import ServingContext, check_prompt_ids
from tessera.core.errors import InvalidRequestError


class ServingTokenize:
    def __init__(self, ctx: ServingContext, chat: ServingChat) -> None:
        self.ctx = ctx
        self.chat = chat

    def tokenize(self, request: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        ctx = self.ctx
        ctx.check_model(request.model)
        tokenizer = ctx.require_tokenizer("/tokenize")
        if isinstance(request, TokenizeChatRequest):
            tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
            ids = self.chat.render(
                [m.model_dump(exclude_none=True) for m in request.messages],
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                add_special_tokens=request.add_special_tokens, chat_template=request.chat_template,
                chat_template_kwargs=request.chat_template_kwargs, tools=tools, documents=request.documents,
            ).prompt_ids
        else:
            ids = list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
        token_strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=ctx.model_info.max_model_len, tokens=ids,
                                token_strs=token_strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        ctx = self.ctx
        ctx.check_model(request.model)
        tokenizer = ctx.require_tokenizer("/detokenize")
        if request.tokens:
            check_prompt_ids(ctx, request.tokens, param="tokens")
        try:
            text = tokenizer.decode(request.tokens)
        except (OverflowError, ValueError, TypeError) as exc:
            raise InvalidRequestError(f"tokens: cannot decode ({exc})", param="tokens") from None
        return DetokenizeResponse(prompt=text)
