"""Per-tokenizer tables every guided backend needs (token bytes, special and EOS ids), built once."""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from tessera.core.interfaces.tokenizer import Tokenizer

T = TypeVar("T")

# JSON whitespace allowed between tokens when the request gives no guided_whitespace_pattern.
# Bounded on purpose: with unbounded whitespace a small model can loop on "\n" until max_tokens.
DEFAULT_JSON_WHITESPACE = r"[ \n]{0,2}"
DEFAULT_MAX_JSON_WHITESPACE = 2

_SENTENCEPIECE_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenizerData:
    """The decoded vocabulary of one tokenizer, as the grammar engines want it."""

    token_bytes: list[bytes]  # id -> exact bytes the token adds to the text; b"" for special tokens
    special_ids: frozenset[int]  # control tokens (never allowed by a grammar, except EOS at the end)
    eos_token_ids: tuple[int, ...]
    vocab_type: str  # "byte_level" | "byte_fallback" | "raw"

    @property
    def num_tokens(self) -> int:
        return len(self.token_bytes)

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids` without special tokens (what the output processor shows)."""
        joined = b"".join(self.token_bytes[t] for t in token_ids if 0 <= t < len(self.token_bytes))
        return joined.decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> the byte it encodes."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in kept:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_BYTE_LEVEL = _bytes_to_unicode()


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:  # a tokenizer that cannot serialize: fall back to decode()
        return set()
    found: set[str] = set()
    stack = [decoder]
    while stack:
        node = stack.pop()
        found.add(node.get("type", ""))
        stack.extend(node.get("decoders") or [])
    return found


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _token_bytes(tokenizer: Any, vocab_type: str, special: set[int]) -> list[bytes]:
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    out: list[bytes] = []
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            out.append(b"")
        elif token_id in added:  # added (non-special) tokens are stored as plain text
            out.append(added[token_id].encode("utf-8"))
        elif vocab_type == "byte_level":
            try:
                out.append(bytes(_BYTE_LEVEL[ch] for ch in piece))
            except KeyError:  # a token outside the byte alphabet: take it literally
                out.append(piece.encode("utf-8"))
        elif vocab_type == "byte_fallback":
            match = _SENTENCEPIECE_BYTE.match(piece)
            out.append(bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))
    return out


def build_tokenizer_data(tokenizer: Any) -> TokenizerData:
    """Decode every token of a tokenizer to the exact bytes it contributes."""
    special = _special_ids(tokenizer)
    if isinstance(tokenizer, Tokenizer):  # not a transformers one (mistral-common): it knows its bytes
        vocab_type, token_bytes = "raw", tokenizer.token_bytes()
    else:
        decoders = _decoder_types(tokenizer)
        if "ByteLevel" in decoders:
            vocab_type = "byte_level"
        elif "ByteFallback" in decoders or "Metaspace" in decoders:
            vocab_type = "byte_fallback"
        else:
            vocab_type = "raw"
        token_bytes = _token_bytes(tokenizer, vocab_type, special)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = tuple(e for e in ([eos] if isinstance(eos, int) else list(eos or [])) if 0 <= e < len(token_bytes))
    if not eos_ids:
        raise ValueError("guided decoding needs a tokenizer with an eos_token_id")
    return TokenizerData(token_bytes, frozenset(special), eos_ids, vocab_type)


_cache: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def cached(tokenizer: Any, key: Any, build: Callable[[], T]) -> T:
    """Per-tokenizer memo: heavy tables (ours and each library's) are built once per tokenizer."""
    with _cache_lock:
        per_tokenizer = _cache.setdefault(tokenizer, {})
        if key in per_tokenizer:
            return per_tokenizer[key]
        lock = per_tokenizer.setdefault(("lock", key), threading.Lock())
    with lock:  # build outside the global lock: two tokenizers can build at the same time
        if key not in per_tokenizer:
            per_tokenizer[key] = build()
        return per_tokenizer[key]


def get_tokenizer_data(tokenizer: Any) -> TokenizerData:
    return cached(tokenizer, "tokenizer_data", lambda: build_tokenizer_data(tokenizer))


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def ids_to_bitmask(token_ids: Any, vocab_size: int) -> torch.Tensor:
    """A (ceil(vocab/32),) int32 row with bit t set for each t in token_ids (bit 0 = lowest id)."""
    flags = np.zeros(bitmask_words(vocab_size) * 32, dtype=np.uint8)
    ids = np.asarray(token_ids, dtype=np.int64)
    flags[ids[(ids >= 0) & (ids < vocab_size)]] = 1
    packed = np.packbits(flags, bitorder="little")  # 4 bytes per int32 word, little-endian
    return torch.from_numpy(packed.view("<i4").astype(np.int32))


def bitmask_to_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    """The allowed token ids of one bitmask row (tests and slow paths only)."""
    packed = row.to(torch.int32).numpy().astype("<i4").view(np.uint8)
    flags = np.unpackbits(packed, bitorder="little")[:vocab_size]
    return np.flatnonzero(flags).tolist()


def fill_eos_only(bitmask: torch.Tensor, row: int, eos_token_ids: tuple[int, ...]) -> None:
    """Row `row` allows only EOS: what a grammar that already accepted EOS answers (fail closed)."""
    bitmask[row].zero_()
    for eos in eos_token_ids:
        bitmask[row, eos >> 5] |= _bit(eos & 31)


def _bit(position: int) -> int:
    # int32 two's complement: bit 31 is the sign bit
    return -(1 << 31) if position == 31 else 1 << position
