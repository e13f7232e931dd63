"""Turn a request's guided_* / response_format / structured_outputs parameters into one GuidedConstraint."""

from __future__ import annotations

import json
from typing import Any

from tessera.api.protocol import SamplingExtras
from tessera.core.errors import InvalidRequestError
from tessera.core.interfaces.guided import GuidedConstraint

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_STRUCTURED_OPTIONS = ("backend", "whitespace_pattern", "disable_fallback", "disable_any_whitespace",
                       "disable_additional_properties")


def _schema_text(value: Any, param: str) -> str:
    """A JSON schema given as an object or as JSON text, normalized to JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param}: not valid JSON ({exc})", param=param) from None
    if not isinstance(value, dict | bool):
        raise InvalidRequestError(f"{param}: a JSON schema must be an object", param=param)
    return json.dumps(value)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param}: must be a non-empty string", param=param)
    return value


def _choices(value: Any, param: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise InvalidRequestError(f"{param}: must be a non-empty list of strings", param=param)
    return json.dumps(value)


def _candidates(request: SamplingExtras) -> list[tuple[str, str, str]]:
    """(param name, kind, spec) for every constraint the request sets."""
    found: list[tuple[str, str, str]] = []
    if request.guided_json is not None:
        found.append(("guided_json", "json", _schema_text(request.guided_json, "guided_json")))
    if request.guided_regex is not None:
        found.append(("guided_regex", "regex", _string(request.guided_regex, "guided_regex")))
    if request.guided_choice is not None:
        found.append(("guided_choice", "choice", _choices(request.guided_choice, "guided_choice")))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", "grammar", _string(request.guided_grammar, "guided_grammar")))
    rf = request.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", "json_object", ""))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise InvalidRequestError(
                "response_format: type json_schema needs json_schema.schema", param="response_format"
            )
        found.append(("response_format", "json", _schema_text(rf.json_schema.json_schema, "response_format")))
    so = request.structured_outputs
    if so is not None:
        unknown = set(so) - set(_STRUCTURED_KINDS) - set(_STRUCTURED_OPTIONS)
        if unknown:
            raise InvalidRequestError(
                f"structured_outputs: unknown keys {sorted(unknown)}; use one of {list(_STRUCTURED_KINDS)}",
                param="structured_outputs",
            )
        for key in _STRUCTURED_KINDS:
            value = so.get(key)
            if value is None or value is False:
                continue
            param = f"structured_outputs.{key}"
            if key == "json":
                found.append((param, "json", _schema_text(value, param)))
            elif key == "choice":
                found.append((param, "choice", _choices(value, param)))
            elif key == "json_object":
                found.append((param, "json_object", ""))
            else:
                found.append((param, key, _string(value, param)))
    return found


def guided_constraint(request: SamplingExtras, extra: tuple[str, str, str] | None = None) -> GuidedConstraint | None:
    """The request's single constraint, or None. `extra` is one derived elsewhere (tool_choice).

    More than one constraint is a 400 naming all of them: silently picking one would return
    output that ignores the other.
    """
    found = _candidates(request)
    if extra is not None:
        found.append(extra)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _, _ in found)
        raise InvalidRequestError(
            f"Only one structured-output constraint may be given per request, got: {names}",
            param=found[1][0],
        )
    _, kind, spec = found[0]
    so = request.structured_outputs or {}
    backend = request.guided_decoding_backend or so.get("backend")
    whitespace = request.guided_whitespace_pattern or so.get("whitespace_pattern")
    if backend is not None and not isinstance(backend, str):
        raise InvalidRequestError("guided_decoding_backend: must be a string", param="guided_decoding_backend")
    if whitespace is not None and not isinstance(whitespace, str):
        raise InvalidRequestError(
            "guided_whitespace_pattern: must be a string", param="guided_whitespace_pattern"
        )
    return GuidedConstraint(kind=kind, spec=spec, backend=backend, whitespace_pattern=whitespace)  # type: ignore[arg-type]


def constraint_param(request: SamplingExtras) -> str | None:
    """The parameter that carried the request's constraint (for error messages)."""
    found = _candidates(request)
    return found[0][0] if found else None
