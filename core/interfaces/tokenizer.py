"""Tokenizer: a non-transformers tokenizer a WeightLoader may return, which also encodes chat itself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Tokenizer(ABC):
    """What tessera calls on a tokenizer, for tokenizers that are not transformers ones
    (`--tokenizer-mode mistral`: mistral-common's).

    The methods mirror the transformers names tessera uses everywhere (encode, decode,
    convert_ids_to_tokens, eos_token_id, all_special_ids, len()), so the engine and the API
    treat both kinds alike. Two differences the API and guided decoding ask about:

    - chat is encoded by `encode_chat`, never rendered with a jinja template (so there is no
      `chat_template`, and `--chat-template` / a request's `chat_template` are refused);
    - `token_bytes` gives the exact bytes of every token, for the guided-decoding tables.

    Instances cross the engine-process boundary with the model info: they must pickle.
    """

    chat_template: str | None = None  # never a template: chat goes through encode_chat

    @property
    @abstractmethod
    def eos_token_id(self) -> int:
        """The end-of-sequence token."""

    @property
    @abstractmethod
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence token (added by `encode(..., add_special_tokens=True)`)."""

    @property
    @abstractmethod
    def all_special_ids(self) -> list[int]:
        """Control tokens: never text, skipped by `decode(..., skip_special_tokens=True)`."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of token ids, special ones included."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain text -> token ids (with BOS when `add_special_tokens`); special-token
        spellings in the text are encoded as text, never as control tokens."""

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text; control tokens appear spelled out unless skipped."""

    @abstractmethod
    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        """The vocabulary entry of each id (as /tokenize's `token_strs` shows it)."""

    @abstractmethod
    def token_bytes(self) -> list[bytes]:
        """id -> the exact bytes the token adds to the text; b"" for control tokens."""

    @abstractmethod
    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        continue_final_message: bool = False,
    ) -> list[int]:
        """OpenAI chat messages (and tools) -> the prompt's token ids, ready for the assistant's
        turn (or continuing the final assistant message). Raises InvalidRequestError naming
        `messages` for a conversation the tokenizer cannot encode."""
