"""`--tokenizer-mode mistral`: the mistral-common adapter against mistral-common itself."""

from __future__ import annotations

import os
import pickle

import pytest
from fixtures_models import save_mistral_tokenizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

from tessera.core.config import ModelConfig
from tessera.core.engine.detokenizer import IncrementalDetokenizer
from tessera.core.errors import ConfigError, InvalidRequestError
from tessera.core.interfaces import Tokenizer
from tessera.plugins.guided._tokenizer_data import build_tokenizer_data
from tessera.plugins.loaders.common import load_hf_tokenizer
from tessera.plugins.loaders.mistral_tokenizer import (
    MistralTokenizer,
    find_mistral_tokenizer_file,
    mistral_tool_call_id,
)
from tessera.plugins.tool_parsers.mistral import MistralToolParser

KINDS = ("v3", "v7", "tekken")
TEXTS = [
    "Hello, world!",
    "  leading spaces, tabs\tand\nnew lines\n",
    "wörld 😀 日本語 — ünïcödé",
    "[INST] looks special [/INST] but is text </s>",
]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {}}},
]


@pytest.fixture(scope="module", params=KINDS)
def files(request, tmp_path_factory) -> tuple[MistralTokenizer, MistralCommonTokenizer]:
    """(our adapter, mistral-common's own tokenizer) over the same file."""
    path = save_mistral_tokenizer(str(tmp_path_factory.mktemp(f"mistral-{request.param}")), request.param)
    return MistralTokenizer(path), MistralCommonTokenizer.from_file(path)


def _raw(reference: MistralCommonTokenizer):
    return reference.instruct_tokenizer.tokenizer


def test_encode_decode_match_mistral_common(files):
    tokenizer, reference = files
    raw = _raw(reference)
    assert isinstance(tokenizer, Tokenizer)
    assert len(tokenizer) == raw.n_words
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (raw.bos_id, raw.eos_id) == (1, 2)
    assert set(raw.special_ids) <= set(tokenizer.all_special_ids)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == raw.encode(text, bos=True, eos=False)
        assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
        assert tokenizer.decode(ids) == raw.decode(ids, SpecialTokenPolicy.IGNORE) == reference.decode(ids) == text
    # "[INST]" typed by a user is text, not the control token
    assert raw.get_special_token("[INST]") not in tokenizer.encode(TEXTS[3])


def test_decode_spells_control_tokens_unless_skipped(files):
    tokenizer, reference = files
    raw = _raw(reference)
    tool_calls = raw.get_special_token("[TOOL_CALLS]")
    ids = [*tokenizer.encode("Sure."), tool_calls, *tokenizer.encode('[{"name": "f"}]', add_special_tokens=False), 2]
    assert tokenizer.decode(ids) == raw.decode(ids, SpecialTokenPolicy.IGNORE)
    kept = tokenizer.decode(ids, skip_special_tokens=False)
    assert kept.startswith("<s>Sure.[TOOL_CALLS]") and kept.endswith('"f"}]</s>')
    assert "\u2581" not in kept  # sentencepiece pieces are decoded, not shown raw
    assert tokenizer.decode(ids + [len(tokenizer) + 5]) == tokenizer.decode(ids)  # padded LM-head ids: no text


def test_incremental_detokenizer_adds_up_to_a_full_decode(files):
    tokenizer, _ = files
    ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    ids = ids[:7] + [4, 2] + ids[7:]  # control tokens in the middle
    for skip in (True, False):
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        assert "".join(detokenizer.step(t) for t in ids) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_token_bytes_rebuild_the_text(files):
    tokenizer, reference = files
    token_bytes = tokenizer.token_bytes()
    assert len(token_bytes) == len(tokenizer)
    assert all(token_bytes[t] == b"" for t in tokenizer.all_special_ids)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        joined = b"".join(token_bytes[t] for t in ids).decode("utf-8")
        # sentencepiece puts a space before the first word, which decoding drops
        assert joined == text or joined == " " + text
    data = build_tokenizer_data(tokenizer)  # what every guided backend reads
    assert data.token_bytes == token_bytes and data.eos_token_ids == (2,)
    assert set(tokenizer.all_special_ids) <= data.special_ids


def test_pickles_as_its_file(files):
    tokenizer, _ = files
    copy = pickle.loads(pickle.dumps(tokenizer))  # as it crosses to the API process
    assert copy.path == tokenizer.path and copy.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])


def _reference_chat(reference: MistralCommonTokenizer, messages, tools=None, **kwargs) -> list[int]:
    request = ChatCompletionRequest.from_openai(messages, tools=tools, **kwargs)
    return reference.encode_chat_completion(request).tokens


def test_chat_matches_encode_chat_completion(files):
    tokenizer, reference = files
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
    ]
    ids = tokenizer.encode_chat(messages)
    assert ids == _reference_chat(reference, messages)
    assert ids[0] == 1 and ids[-1] == _raw(reference).get_special_token("[/INST]")
    assert tokenizer.encode_chat(messages, TOOLS) == _reference_chat(reference, messages, TOOLS)
    assert tokenizer.encode_chat(messages, TOOLS) != ids  # the tools are in the prompt
    prefix = [*messages, {"role": "assistant", "content": "It is"}]
    assert tokenizer.encode_chat(prefix, continue_final_message=True) == _reference_chat(
        reference, prefix, continue_final_message=True
    )


def test_tool_history_ids_round_trip(files):
    """Mistral accepts only 9-character alphanumeric ids: the ids the mistral parser gives pass
    unchanged; OpenAI-style ones become their last 9 characters in the call and in its result."""
    tokenizer, reference = files

    def history(call_id: str, arguments) -> list[dict]:
        return [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
            ]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21}'},
        ]

    as_string = tokenizer.encode_chat(history("a1B2c3D4e", '{"city": "Paris"}'), TOOLS)
    assert as_string == _reference_chat(reference, history("a1B2c3D4e", '{"city": "Paris"}'), TOOLS)
    assert tokenizer.encode_chat(history("a1B2c3D4e", {"city": "Paris"}), TOOLS) == as_string
    openai_id = "call_0123456789abcdefa1B2c3D4e"
    assert mistral_tool_call_id(openai_id) == "a1B2c3D4e"
    assert tokenizer.encode_chat(history(openai_id, '{"city": "Paris"}'), TOOLS) == as_string
    odd = mistral_tool_call_id("call-1")
    assert len(odd) == 9 and odd.isalnum() and odd == mistral_tool_call_id("call-1")
    assert tokenizer.encode_chat(history("call-1", "{}"), TOOLS)  # still encodable


def test_mistral_parser_ids_come_back_unchanged(files):
    """A call the `mistral` tool parser read from the model, sent back as history, reaches the model
    with the parser's own 9-character id."""
    tokenizer, reference = files
    parsed = MistralToolParser(tokenizer, TOOLS).extract_tool_calls(
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    )
    (call,) = parsed.tool_calls
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}},
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    ids = tokenizer.encode_chat(history, TOOLS)
    assert ids == _reference_chat(reference, history, TOOLS)
    assert tokenizer.decode(ids, skip_special_tokens=False).count(call.id) == 2


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],  # nothing to answer
    [{"role": "assistant", "content": "first"}],
    [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "x"}],
    [{"role": "narrator", "content": "Hi"}],
])
def test_conversations_mistral_cannot_encode_are_request_errors(files, messages):
    tokenizer, _ = files
    with pytest.raises(InvalidRequestError) as exc:
        tokenizer.encode_chat(messages)
    assert exc.value.param == "messages" and "mistral-common" in exc.value.message


def test_file_choice_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        find_mistral_tokenizer_file(str(tmp_path))
    assert "--tokenizer-mode mistral" in exc.value.message and "tekken.json" in exc.value.message
    with pytest.raises(ConfigError, match="no mistral-common tokenizer file"):
        load_hf_tokenizer(str(tmp_path), ModelConfig(tokenizer_mode="mistral"))
    v3 = save_mistral_tokenizer(str(tmp_path), "v3")
    assert find_mistral_tokenizer_file(str(tmp_path)) == v3
    assert find_mistral_tokenizer_file(str(tmp_path / "model.gguf")) == v3  # a GGUF file's folder
    v7 = save_mistral_tokenizer(str(tmp_path), "v7")
    assert find_mistral_tokenizer_file(str(tmp_path)) == v7  # the newest version
    tekken = save_mistral_tokenizer(str(tmp_path), "tekken")
    assert find_mistral_tokenizer_file(str(tmp_path)) == tekken  # tekken.json wins, as in mistral-common
    assert find_mistral_tokenizer_file(v3) == v3
    loaded = load_hf_tokenizer(str(tmp_path), ModelConfig(tokenizer_mode="mistral"))
    assert isinstance(loaded, MistralTokenizer) and os.path.basename(loaded.path) == "tekken.json"
    assert load_hf_tokenizer(str(tmp_path), ModelConfig(tokenizer_mode="mistral", skip_tokenizer_init=True)) is None


def test_damaged_file_is_a_config_error(tmp_path):
    (tmp_path / "tokenizer.model.v3").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="mistral-common cannot load"):
        load_hf_tokenizer(str(tmp_path), ModelConfig(tokenizer_mode="mistral"))


def test_gguf_models_take_the_file_next_to_the_gguf(smollm2_path, tmp_path):
    from tessera.plugins.loaders.gguf_loader import GgufLoader

    config = ModelConfig(tokenizer_mode="mistral")
    with pytest.raises(ConfigError, match="no mistral-common tokenizer file"):
        GgufLoader().load_files(smollm2_path, config)
    gguf = tmp_path / os.path.basename(smollm2_path)
    os.symlink(smollm2_path, gguf)
    save_mistral_tokenizer(str(tmp_path), "v3")
    files = GgufLoader().load_files(str(gguf), config)
    assert isinstance(files.tokenizer, MistralTokenizer) and files.chat_template is None  # not the file's template
