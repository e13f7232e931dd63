"""ServerConfig: the HTTP server's own flags (not the engine's), read from the parsed CLI namespace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tessera.core.config import api_key_from_env


def _tuple(value: Any, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...] = ()  # empty: the --model name (or the model file's name)
    api_key: str | None = None
    chat_template: str | None = None  # --chat-template: a file, a named tokenizer template, or inline
    response_role: str = "assistant"
    trust_request_chat_template: bool = False
    max_logprobs: int = 20
    return_tokens_as_token_ids: bool = False
    root_path: str = ""
    middleware: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    disable_log_requests: bool = False
    max_log_len: int | None = None

    @classmethod
    def from_args(cls, ns: Any) -> ServerConfig:
        """From `tessera serve`'s namespace (argparse dest names of the spec's flags)."""

        def get(name: str, default: Any = None) -> Any:
            value = getattr(ns, name, None)
            return default if value is None else value

        model = get("model")
        names = _tuple(get("served_model_name")) or ((model,) if model else ())
        return cls(
            served_model_names=names,
            api_key=get("api_key") or api_key_from_env(),
            chat_template=get("chat_template"),
            response_role=get("response_role", "assistant"),
            trust_request_chat_template=bool(get("trust_request_chat_template", False)),
            max_logprobs=int(get("max_logprobs", 20)),
            return_tokens_as_token_ids=bool(get("return_tokens_as_token_ids", False)),
            root_path=get("root_path", "") or "",
            middleware=_tuple(get("middleware")),
            allowed_origins=_tuple(get("allowed_origins"), ("*",)),
            allowed_methods=_tuple(get("allowed_methods"), ("*",)),
            allowed_headers=_tuple(get("allowed_headers"), ("*",)),
            allow_credentials=bool(get("allow_credentials", False)),
            enable_auto_tool_choice=bool(get("enable_auto_tool_choice", False)),
            tool_call_parser=get("tool_call_parser"),
            disable_log_requests=bool(get("disable_log_requests", False)),
            max_log_len=get("max_log_len"),
        )
