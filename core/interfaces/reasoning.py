"""Reasoning parsers: split a model's reasoning from its final answer."""

from __future__ import annotations

from abc import ABC, abstractmethod


class ReasoningParser(ABC):
    """Registered by name; one instance per request, created by the chat serving layer."""

    @abstractmethod
    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """Called on the complete output: (reasoning_content, content)."""
