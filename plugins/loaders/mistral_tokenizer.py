"""`--tokenizer-mode mistral`: a model folder's mistral-common tokenizer file as a tessera Tokenizer."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from itertools import groupby
from typing import Any

from tessera.core.errors import ConfigError, InvalidRequestError
from tessera.core.interfaces.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TEKKEN_FILE = "tekken.json"
# mistral-common's sentencepiece files: tokenizer.model.v3, mistral_instruct_tokenizer_241114.model.v7m1, ...
_SENTENCEPIECE_FILE = re.compile(r".+\.model\.v(\d+)(?:m\d+)?$")
_SENTENCEPIECE_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_MISTRAL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def find_mistral_tokenizer_file(location: str) -> str:
    """The tokenizer file for `location`: itself when it is one, else the `tekken.json` or
    `*.model.vN` file of the folder (a .gguf file's folder for a GGUF model)."""
    name = os.path.basename(location)
    if os.path.isfile(location) and (name == TEKKEN_FILE or name.endswith(".json") or _SENTENCEPIECE_FILE.match(name)):
        return location
    folder = location if os.path.isdir(location) else os.path.dirname(location) or "."
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if TEKKEN_FILE in names:
        return os.path.join(folder, TEKKEN_FILE)
    versioned = sorted((int(m.group(1)), n) for n in names if (m := _SENTENCEPIECE_FILE.match(n)))
    if not versioned:
        raise ConfigError(
            f"--tokenizer-mode mistral: {folder} has no mistral-common tokenizer file ({TEKKEN_FILE} or "
            "tokenizer.model.v1/.v3/.v7/...). Copy the model's Mistral tokenizer file there, or serve "
            "it with --tokenizer-mode auto (its Hugging Face tokenizer and chat template).",
            param="tokenizer_mode",
        )
    if len(versioned) > 1:
        logger.warning("%s has several mistral tokenizer files; using the newest, %s", folder, versioned[-1][1])
    return os.path.join(folder, versioned[-1][1])


def load_mistral_tokenizer(location: str) -> MistralTokenizer:
    path = find_mistral_tokenizer_file(location)
    try:
        return MistralTokenizer(path)
    except Exception as exc:  # a damaged or unknown file: mistral-common raises many kinds
        raise ConfigError(
            f"--tokenizer-mode mistral: mistral-common cannot load {path}: {type(exc).__name__}: {exc}",
            param="tokenizer_mode",
        ) from exc


def mistral_tool_call_id(call_id: str) -> str:
    """Mistral models accept only ids of 9 letters and digits, and OpenAI clients send longer ones
    (`call_` + 24): keep the last 9 characters, as vLLM and examples/tool_chat_template_mistral.jinja
    do, else a digest. Deterministic, so an assistant's call and the tool's answer still match."""
    if _MISTRAL_CALL_ID.match(call_id):
        return call_id
    tail = call_id[-9:]
    if _MISTRAL_CALL_ID.match(tail):
        return tail
    return hashlib.sha256(call_id.encode("utf-8")).hexdigest()[:9]


def _mistral_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as mistral-common's from_openai reads it, tool call ids made acceptable."""
    message = {k: v for k, v in message.items() if v is not None}
    if message.get("tool_calls"):
        message["tool_calls"] = [
            {**call, "id": mistral_tool_call_id(str(call.get("id", "")))} for call in message["tool_calls"]
        ]
    if message.get("role") == "tool" and "tool_call_id" in message:
        message["tool_call_id"] = mistral_tool_call_id(str(message["tool_call_id"]))
    return message


class MistralTokenizer(Tokenizer):
    """mistral-common's tokenizer (tekken or sentencepiece) behind the transformers-like surface
    tessera uses; chat goes through mistral-common's ChatCompletionRequest, as in vLLM."""

    def __init__(self, path: str) -> None:
        from mistral_common.tokens.tokenizers.mistral import (
            MistralTokenizer as MistralCommonTokenizer,
        )
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        self.path = path
        self._mistral = MistralCommonTokenizer.from_file(path)
        self._raw = self._mistral.instruct_tokenizer.tokenizer  # Tekkenizer | SentencePieceTokenizer
        self._is_tekken = isinstance(self._raw, Tekkenizer)
        self._num_tokens = int(self._raw.n_words)
        # sentencepiece's <unk> is no control token, but it is no text either
        self._special_ids = frozenset(self._raw.special_ids) | {int(self._raw.unk_id)}

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.path,)  # rebuilt from the file in the other process

    def __repr__(self) -> str:
        return f"MistralTokenizer({self.path!r}, version={self._raw.version.value})"

    @property
    def eos_token_id(self) -> int:
        return int(self._raw.eos_id)

    @property
    def bos_token_id(self) -> int | None:
        return int(self._raw.bos_id)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    def __len__(self) -> int:
        return self._num_tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._raw.encode(text, bos=add_special_tokens, eos=False))

    def decode(self, token_ids: list[int] | int, skip_special_tokens: bool = True) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        ids = [t for t in ids if 0 <= t < self._num_tokens]  # ids of a padded LM head are no text
        if skip_special_tokens:
            return self._raw.decode([t for t in ids if t not in self._special_ids], SpecialTokenPolicy.IGNORE)
        if self._is_tekken:
            return self._raw.decode(ids, SpecialTokenPolicy.KEEP)
        # sentencepiece's KEEP policy spells every token as its raw piece ("▁Hello"): decode the text
        # runs and spell out only the control tokens
        parts: list[str] = []
        for is_special, run in groupby(ids, self._special_ids.__contains__):
            run_ids = list(run)
            if is_special:
                parts.extend(self._raw.id_to_piece(t) for t in run_ids)
            else:
                parts.append(self._raw.decode(run_ids, SpecialTokenPolicy.IGNORE))
        return "".join(parts)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [self._raw.id_to_piece(t) for t in token_ids]

    def token_bytes(self) -> list[bytes]:
        if self._is_tekken:
            tekken: Any = self._raw
            return [b"" if t in self._special_ids else tekken.id_to_byte_piece(t) for t in range(self._num_tokens)]
        out = []
        for token_id in range(self._num_tokens):
            piece = self._raw.id_to_piece(token_id)
            match = _SENTENCEPIECE_BYTE.match(piece)
            if token_id in self._special_ids:
                out.append(b"")
            elif match:
                out.append(bytes([int(match.group(1), 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        continue_final_message: bool = False,
    ) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(
                [_mistral_message(m) for m in messages], tools=tools, continue_final_message=continue_final_message
            )
            return list(self._mistral.encode_chat_completion(request).tokens)
        except Exception as exc:  # validation and encoding failures are the conversation's
            raise InvalidRequestError(
                f"messages: mistral-common cannot encode this conversation: {type(exc).__name__}: {exc}",
                param="messages",
            ) from None
