"""The offline engine with tokenizer_mode="mistral": mistral-common's tokens in, transformers' greedy
tokens out, on a tiny random Mistral model whose vocabulary is the tokenizer's."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fixtures_models import save_mistral_model
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MistralCommonTokenizer

from tessera import LLM, SamplingParams
from tessera.core.errors import ConfigError
from tessera.core.interfaces.guided import GuidedConstraint
from tessera.plugins.loaders.mistral_tokenizer import MistralTokenizer, find_mistral_tokenizer_file

MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "Once upon a time, wörld 😀"]


@pytest.fixture(scope="module", params=["v3", "tekken"])
def model_dir(request, tmp_path_factory) -> str:
    return save_mistral_model(str(tmp_path_factory.mktemp(f"tiny-mistral-{request.param}")), request.param)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, tokenizer_mode="mistral", dtype="float32", num_blocks_override=64)


@pytest.fixture(scope="module")
def reference(model_dir) -> MistralCommonTokenizer:
    return MistralCommonTokenizer.from_file(find_mistral_tokenizer_file(model_dir))


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_text_prompts_match_mistral_common_and_transformers(llm, model_dir, reference):
    from transformers import AutoModelForCausalLM

    assert isinstance(llm.get_tokenizer(), MistralTokenizer)
    assert llm.model_info.chat_template is None
    raw = reference.instruct_tokenizer.tokenizer
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, _greedy())):
        ids = raw.encode(prompt, bos=True, eos=False)
        assert output.prompt_token_ids == ids
        expected = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS, pad_token_id=0,
        )[0, len(ids):].tolist()
        tokens = output.outputs[0].token_ids
        assert tokens == expected
        # the detokenizer holds back a character whose bytes are not all generated yet
        assert output.outputs[0].text == reference.decode(tokens).removesuffix("\ufffd")


def test_chat_is_encoded_by_mistral_common(llm, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    (output,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=2))
    request = ChatCompletionRequest.from_openai(messages)
    assert output.prompt_token_ids == reference.encode_chat_completion(request).tokens
    with pytest.raises(ValueError, match="tokenizer_mode='mistral'"):
        llm.chat(messages, chat_template="{{ messages }}")


@pytest.mark.parametrize("backend", ["xgrammar", "llguidance", "outlines", "lm-format-enforcer"])
def test_guided_decoding_reads_the_mistral_vocabulary(llm, backend):
    choices = ["Paris café", "Zürich"]
    constraint = GuidedConstraint("choice", json.dumps(choices), backend=backend)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=16, guided=constraint) for seed in range(3)]
    outputs = llm.generate(["Pick one:"] * 3, params)
    assert all(o.outputs[0].text in choices for o in outputs), [o.outputs[0].text for o in outputs]


def test_missing_tokenizer_file_is_a_clear_error(model_dir, tmp_path):
    for name in os.listdir(model_dir):  # the model without its mistral tokenizer file
        if name.endswith((".json", ".safetensors")) and name != "tekken.json":
            os.symlink(os.path.join(model_dir, name), tmp_path / name)
    with pytest.raises(ConfigError) as exc:
        LLM(str(tmp_path), tokenizer_mode="mistral", dtype="float32", num_blocks_override=16)
    assert "--tokenizer-mode mistral" in exc.value.message and str(tmp_path) in exc.value.message
