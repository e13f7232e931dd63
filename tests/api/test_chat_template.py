"""Chat template resolution and sandboxed rendering."""

from __future__ import annotations

import pytest
from fake_engine import CHATML, make_tokenizer

from tessera.api.chat_template import render_chat, resolve_chat_template
from tessera.core.errors import ConfigError, InvalidRequestError

USER = [{"role": "user", "content": "Hi"}]


def test_default_is_the_models_template_then_the_tokenizers():
    tok = make_tokenizer()
    assert resolve_chat_template(None, "GGUF {{ x }}", tok) == "GGUF {{ x }}"
    assert resolve_chat_template(None, None, tok) == CHATML
    assert resolve_chat_template(None, None, make_tokenizer(None)) is None


def test_file_inline_and_named_templates(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("FILE{{ messages[0].content }}")
    assert resolve_chat_template(str(path), None, None) == "FILE{{ messages[0].content }}"
    assert resolve_chat_template("A{{ 1 }}\\nB", None, None) == "A{{ 1 }}\nB"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_chat_template(str(tmp_path / "missing.jinja"), None, None)
    tok = make_tokenizer()
    tok.chat_template = {"default": CHATML, "tool_use": "TOOLS{{ tools | tojson }}"}
    assert resolve_chat_template("tool_use", None, tok) == "TOOLS{{ tools | tojson }}"
    with pytest.raises(ConfigError, match="tool_use"):
        resolve_chat_template("tool_use", None, make_tokenizer())
    with pytest.raises(ConfigError, match="does not compile"):
        resolve_chat_template("{% if %}", None, None)


def test_hf_template_helpers():
    out = render_chat(
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% break %}{% endfor %}",
        [{"role": "user", "content": "é"}], add_generation_prompt=False,
    )
    assert out == '[{"role": "user", "content": "é"}]|4|é'


def test_tool_call_arguments_are_objects_in_the_template():
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    out = render_chat("{{ messages[0].tool_calls[0].function.arguments.a }}", messages, add_generation_prompt=False)
    assert out == "1"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'content': 'x'}) }}",
])
def test_the_sandbox_blocks_unsafe_access(template):
    with pytest.raises(InvalidRequestError):
        render_chat(template, USER, add_generation_prompt=False)


def test_raise_exception_is_a_400_with_the_templates_message():
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", USER, add_generation_prompt=True)


def test_template_runtime_errors_are_400():
    with pytest.raises(InvalidRequestError):
        render_chat("{{ messages[5].content.upper() }}", USER, add_generation_prompt=True)
    with pytest.raises(InvalidRequestError):
        render_chat("{{ 1 / 0 }}", USER, add_generation_prompt=True)


def test_continue_final_message_cuts_the_end_of_turn():
    messages = USER + [{"role": "assistant", "content": "The answer is"}]
    out = render_chat(CHATML, messages, add_generation_prompt=False, continue_final_message=True)
    assert out.endswith("<|im_start|>assistant\nThe answer is")
