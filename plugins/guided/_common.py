"""Backend-independent checks of a guided constraint: parse and validate the spec, name the parameter."""

from __future__ import annotations

import functools
import json
import re
import warnings
from typing import Any

from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.guided import GuidedConstraint

# the request parameter a constraint kind came from (as the user most often spells it)
PARAM = {
    "json": "guided_json",
    "json_object": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}

# characters with a meaning in regex syntax (Python re, Rust regex, xgrammar, llguidance)
_REGEX_META = set("\\.^$|?*+()[]{}-&~#")


def param_of(constraint: GuidedConstraint) -> str:
    return PARAM.get(constraint.kind, "guided_decoding")


@functools.lru_cache(maxsize=256)
def parse_schema(spec: str) -> dict[str, Any] | bool:
    """The JSON schema of a `json` constraint; InvalidRequestError if it is not a valid schema."""
    import jsonschema  # imported here: only JSON-schema requests pay for it

    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"guided_json is not valid JSON: {exc}", param="guided_json") from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError(
            f"guided_json must be a JSON schema object, got {type(schema).__name__}", param="guided_json"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequestError(f"guided_json is not a valid JSON schema: {exc.message}", param="guided_json") from None
    return schema


@functools.lru_cache(maxsize=256)
def parse_choices(spec: str) -> tuple[str, ...]:
    """The choices of a `choice` constraint (spec is a JSON list of strings)."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise InvalidRequestError("guided_choice must be a non-empty list of strings", param="guided_choice")
    if any(c == "" for c in choices):
        raise InvalidRequestError("guided_choice must not contain an empty string", param="guided_choice")
    return tuple(choices)


@functools.lru_cache(maxsize=256)
def check_regex(pattern: str, param: str = "guided_regex") -> str:
    """Reject a regex that no dialect can parse; backends then report their own limits as reasons."""
    try:
        with warnings.catch_warnings():  # e.g. FutureWarning for "[[" (a valid POSIX class elsewhere)
            warnings.simplefilter("ignore")
            re.compile(pattern)
    except re.error as exc:
        raise InvalidRequestError(f"{param} is not a valid regular expression: {exc}", param=param) from None
    return pattern


def escape_regex(text: str) -> str:
    """Escape `text` for any of the regex dialects: only metacharacters, so Rust's parser accepts it."""
    out = []
    for ch in text:
        if ch in _REGEX_META:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch)
    return "".join(out)


def choice_regex(choices: tuple[str, ...]) -> str:
    return "(" + "|".join(escape_regex(c) for c in choices) + ")"


def check_spec(constraint: GuidedConstraint) -> None:
    """The checks every backend shares: raise InvalidRequestError for a malformed spec."""
    if constraint.kind == "json":
        parse_schema(constraint.spec)
    elif constraint.kind == "choice":
        parse_choices(constraint.spec)
    elif constraint.kind == "regex":
        check_regex(constraint.spec)
    elif constraint.kind == "grammar":
        if not constraint.spec.strip():
            raise InvalidRequestError("guided_grammar must not be empty", param="guided_grammar")
    elif constraint.kind != "json_object":
        raise InvalidRequestError(f"unknown guided constraint kind {constraint.kind!r}", param="guided_decoding")
    if constraint.whitespace_pattern is not None:
        check_regex(constraint.whitespace_pattern, "guided_whitespace_pattern")


def reason_from(exc: Exception) -> str:
    """A library's error as one short line (xgrammar prefixes a timestamp and a C++ path)."""
    text = str(exc).strip().splitlines()
    line = next((t for t in text if t.strip()), type(exc).__name__)
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)[:300]
