"""Chat templates: find the template to use, and render messages with it in a jinja2 sandbox."""

from __future__ import annotations

import codecs
import functools
import json
import logging
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tessera.core.errors import ConfigError, InvalidRequestError

logger = logging.getLogger(__name__)

NO_TEMPLATE_MESSAGE = (
    "This model has no chat template, so chat requests cannot be rendered. Start the server with "
    "--chat-template pointing at a Jinja template file (or an inline template), or use /v1/completions."
)


class _GenerationTag(Extension):
    """HF templates may mark assistant text with {% generation %}...{% endgeneration %}; render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile in the immutable sandbox: no attribute access to internals, no mutation of inputs."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def check_no_chat_template(option: str | None) -> None:
    """A tokenizer that encodes chat itself (--tokenizer-mode mistral) takes no template."""
    if option is not None:
        raise ConfigError(
            "--chat-template cannot be used with --tokenizer-mode mistral: mistral-common encodes chat "
            "requests itself. Remove --chat-template, or serve with --tokenizer-mode auto to use a template.",
            param="chat_template",
        )


def _tokenizer_templates(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's templates by name ('default', 'tool_use', ...)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        return {str(k): v for k, v in template.items() if isinstance(v, str)}
    if isinstance(template, list):  # the tokenizer_config.json form: [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
    if isinstance(template, str):
        return {"default": template}
    return {}


def resolve_chat_template(option: str | None, model_template: str | None, tokenizer: Any) -> str | None:
    """The template to serve with: --chat-template (a file, a named tokenizer template such as
    `tool_use`, or an inline template), else the model's (GGUF or tokenizer) default."""
    named = _tokenizer_templates(tokenizer)
    if option is None:
        source = model_template or named.get("default")
    elif option in named:
        source = named[option]
    elif option == "tool_use":
        raise ConfigError(
            "--chat-template tool_use: the tokenizer has no template named 'tool_use' "
            f"(it has: {sorted(named) or 'none'})", param="chat_template",
        )
    elif os.path.isfile(option):
        with open(option, encoding="utf-8") as f:
            source = f.read()
    elif not any(c in option for c in "{}") and (os.sep in option or option.endswith((".jinja", ".j2"))):
        raise ConfigError(f"--chat-template: file {option!r} does not exist", param="chat_template")
    else:
        # An inline template on the command line: interpret escapes such as \n as vLLM does.
        source = codecs.decode(option, "unicode_escape")
    if source is not None:
        try:
            compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"--chat-template does not compile: {exc}", param="chat_template") from None
    return source


def _text_of(content: Any) -> str | None:
    """OpenAI content (a string or a list of parts) as the string a template expects."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        part_type = part.get("type")
        if part_type in ("text", "input_text"):
            texts.append(part.get("text") or "")
        else:
            raise InvalidRequestError(
                f"messages: content parts of type {part_type!r} are not supported (text only)",
                param="messages",
            )
    return "\n".join(texts)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain-string content, and tool-call arguments as objects (templates index into them)."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        if "content" in message:
            message["content"] = _text_of(message["content"])
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    try:
                        function["arguments"] = json.loads(arguments)
                    except json.JSONDecodeError:
                        pass
                call["function"] = function
                calls.append(call)
            message["tool_calls"] = calls
        out.append(message)
    return out


def check_generation_flags(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError(
            "add_generation_prompt and continue_final_message cannot both be true", param="continue_final_message"
        )


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, str]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    special_tokens: dict[str, str | None] | None = None,
) -> str:
    """Render the conversation; any template failure is the request's fault (400), never a 500."""
    check_generation_flags(add_generation_prompt, continue_final_message)
    messages = normalize_messages(messages)
    if continue_final_message and (not messages or not isinstance(messages[-1].get("content"), str)):
        raise InvalidRequestError(
            "continue_final_message needs a final message with text content", param="continue_final_message"
        )
    context: dict[str, Any] = dict(template_kwargs or {})
    context.update(special_tokens or {})
    context.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents)
    try:
        rendered = compile_template(template).render(**context)
    except jinja2.exceptions.SecurityError as exc:
        raise InvalidRequestError(f"chat template blocked by the sandbox: {exc}", param="chat_template") from None
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(f"chat template does not compile: {exc}", param="chat_template") from None
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"chat template error: {exc}", param="messages") from None
    except Exception as exc:  # whatever a template does with these messages is the request's problem
        raise InvalidRequestError(
            f"chat template failed on these messages: {type(exc).__name__}: {exc}", param="messages"
        ) from None
    if continue_final_message:
        rendered = _cut_after_final_message(rendered, messages[-1]["content"])
    return rendered


def _cut_after_final_message(rendered: str, final_content: str) -> str:
    """Drop the end-of-turn tokens the template put after the final message, so the model continues it."""
    needle = final_content.strip()
    index = rendered.rfind(needle) if needle else -1
    if index < 0:
        raise InvalidRequestError(
            "continue_final_message: the final message does not appear in the rendered prompt",
            param="continue_final_message",
        )
    return rendered[: index + len(needle)]


def special_tokens_of(tokenizer: Any) -> dict[str, str | None]:
    """The special-token strings templates refer to (bos_token, eos_token, ...)."""
    if tokenizer is None:
        return {}
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: _as_str(getattr(tokenizer, name, None)) for name in names}


def _as_str(token: Any) -> str | None:
    return None if token is None else str(token)
