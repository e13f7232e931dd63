"""Format engine logprobs the way OpenAI's completions and chat APIs spell them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tessera.api.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from tessera.core.outputs import PositionLogprobs

TokenText = Callable[[int], str]

_MIN_LOGPROB = -9999.0  # JSON has no -inf


def finite(logprob: float) -> float:
    return _MIN_LOGPROB if math.isinf(logprob) or math.isnan(logprob) else max(logprob, _MIN_LOGPROB)


def _top(position: PositionLogprobs, num_top: int) -> list[tuple[int, float]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank)
    return [(tid, lp.logprob) for tid, lp in ranked if lp.rank <= num_top]


def append_completion_logprobs(
    into: CompletionLogprobs,
    token_ids: Sequence[int],
    positions: Sequence[PositionLogprobs | None],
    num_top: int,
    token_text: TokenText,
    start_offset: int,
) -> int:
    """Append one span of tokens; returns the text offset after it (offsets continue across chunks)."""
    offset = start_offset
    for tid, position in zip(token_ids, positions, strict=False):
        text = token_text(tid)
        into.tokens.append(text)
        into.text_offset.append(offset)
        offset += len(text)
        if position is None:  # the first prompt token has no logprob
            into.token_logprobs.append(None)
            into.top_logprobs.append(None)
            continue
        chosen = position.get(tid)
        into.token_logprobs.append(finite(chosen.logprob) if chosen is not None else None)
        top = {token_text(t): finite(lp) for t, lp in _top(position, num_top)}
        if chosen is not None:
            top.setdefault(text, finite(chosen.logprob))
        into.top_logprobs.append(top)
    return offset


def chat_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[PositionLogprobs | None],
    num_top: int,
    token_text: TokenText,
) -> list[ChatTokenLogprob]:
    out = []
    for tid, position in zip(token_ids, positions, strict=False):
        text = token_text(tid)
        chosen = position.get(tid) if position else None
        top = [
            TopLogprob(token=token_text(t), logprob=finite(lp), bytes=list(token_text(t).encode()))
            for t, lp in (_top(position, num_top) if position else [])
        ]
        out.append(ChatTokenLogprob(
            token=text,
            logprob=finite(chosen.logprob) if chosen is not None else _MIN_LOGPROB,
            bytes=list(text.encode()),
            top_logprobs=top,
        ))
    return out


def prompt_logprobs_json(
    positions: Sequence[PositionLogprobs | None] | None, token_text: TokenText
) -> list[dict[int, dict[str, object]] | None] | None:
    """vLLM's prompt_logprobs field: per prompt position {token_id: {logprob, rank, decoded_token}}."""
    if positions is None:
        return None
    return [
        None if position is None else {
            tid: {"logprob": finite(lp.logprob), "rank": lp.rank, "decoded_token": token_text(tid)}
            for tid, lp in position.items()
        }
        for position in positions
    ]
