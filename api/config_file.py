"""`tessera serve --config FILE.yaml`: read the file and convert each value as its flag would."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tessera.api.serve_flags import bool_value, json_list, json_object, key_value_ints, long_options


def read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Validate and convert a YAML config file into {dest: value}."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        parser.error(f"--config: cannot read {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        parser.error(f"--config: {path} is not valid YAML: {exc}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config: {path} must hold a mapping of flag names to values")
    options = long_options(parser)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None or flag == "--config":
            known = ", ".join(sorted(o[2:] for o in options if o != "--config"))
            parser.error(f"--config: {path}: unknown key {key!r} (known keys: {known})")
        try:
            values[action.dest] = convert_yaml_value(action, flag, raw)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            parser.error(f"--config: {path}: {key}: {exc}")
    return values


def convert_yaml_value(action: argparse.Action, flag: str, raw: Any) -> Any:
    """A YAML value converted as the command line would convert it, then checked."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw if isinstance(action, argparse._StoreTrueAction) else not raw
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        return not raw if flag.startswith("--no-") else raw
    if raw is None:
        return None
    is_list = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    if is_list:
        items = raw if isinstance(raw, list) else [raw]
        return [convert_value(action, item) for item in items]
    return convert_value(action, raw)


def convert_value(action: argparse.Action, raw: Any) -> Any:
    """One YAML scalar/list/mapping converted as the command line would convert its text."""
    expected = {json_list: list, json_object: dict, key_value_ints: dict}.get(action.type)  # type: ignore[call-overload]
    if isinstance(raw, str):
        value = action.type(raw) if callable(action.type) else raw
    elif expected is not None:  # YAML already gives lists and mappings
        if not isinstance(raw, expected):
            raise ValueError(f"expected a {action.type.__name__}, got {raw!r}")  # type: ignore[union-attr]
        value = raw
    elif action.type is bool_value:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {raw!r}")
        value = raw
    elif action.type in (int, float):
        is_number = isinstance(raw, int | float) and not isinstance(raw, bool)
        if not is_number or (action.type is int and not float(raw).is_integer()):
            raise ValueError(
                f"expected {'an integer' if action.type is int else 'a number'}, got {raw!r}"
            )
        value = action.type(raw)
    elif action.type is None and isinstance(raw, int | float) and not isinstance(raw, bool):
        value = str(raw)  # e.g. `api-key: 1234`
    elif callable(action.type) and isinstance(raw, int | float) and not isinstance(raw, bool):
        # a checked number (`port: 8000`) is checked as its text would be; a whole float is an int
        value = action.type(str(int(raw)) if float(raw).is_integer() else str(raw))
    else:
        raise ValueError(f"expected a string, got {raw!r}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"invalid choice {value!r} (choose from {choices})")
    return value
