"""Guided-decoding backends: compile a constraint into a grammar that masks tokens each step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

ConstraintKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class GuidedConstraint:
    """One request's constraint, normalized from guided_*, response_format or structured_outputs."""

    kind: ConstraintKind
    spec: str  # JSON schema text (kind json), regex, grammar text; choices as a JSON list (kind choice)
    backend: str | None = None  # requested backend, None = the server default
    whitespace_pattern: str | None = None


class Grammar(ABC):
    """The per-request matcher state: one per sequence, advanced token by token."""

    @abstractmethod
    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Called each step before sampling: set row `row` of the int32 bitmask
        (num_rows, ceil(vocab/32)) so that bit t is 1 exactly when token t is allowed."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Called after sampling with the chosen token; False if the grammar rejects it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Called after accept_token: has the constraint been completed (only EOS allowed)?"""

    def copy(self) -> Grammar:
        """Called for n > 1: an independent matcher in the same state."""
        raise NotImplementedError


class GuidedDecodingBackend(ABC):
    """Registered under a `--guided-decoding-backend` name. One instance per (engine, tokenizer).

    The engine calls `unsupported_reason` on the API side to validate a request, then `compile`
    in a worker thread (results are cached by constraint), then `Grammar` methods per step.
    """

    name: str = "abstract"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @abstractmethod
    def unsupported_reason(self, constraint: GuidedConstraint) -> str | None:
        """Called per request before it is queued: why this backend cannot express the
        constraint, or None if it can. Invalid schemas/regexes raise InvalidRequestError."""

    @abstractmethod
    def compile(self, constraint: GuidedConstraint) -> Any:
        """Called in a worker thread: the compiled form, shared by requests with equal constraints."""

    @abstractmethod
    def new_grammar(self, compiled: Any) -> Grammar:
        """Called once per sequence: a fresh matcher for a compiled constraint."""
