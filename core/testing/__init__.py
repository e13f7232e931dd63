"""Helpers that ship in the package so plugin authors can test their plugins against tessera's contracts."""

from tessera.core.testing.tool_parser_conformance import (
    PLAIN_TEXT_SAMPLES,
    check_tool_parser,
    conformance_samples,
)

__all__ = ["PLAIN_TEXT_SAMPLES", "check_tool_parser", "conformance_samples"]
