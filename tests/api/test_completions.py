"""/v1/completions over the fake engine, through the official openai client."""

from __future__ import annotations

import json

import openai
import pytest
from fake_engine import GREEDY_TEXT, SAMPLE_TEXT


def test_text_prompt_greedy(client):
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=5, temperature=0)
    assert r.model == "fake-model"
    assert r.object == "text_completion"
    assert r.choices[0].text == GREEDY_TEXT[:5]
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 5, 7)


def test_finish_on_eos_counts_the_eos_token(client):
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=100, temperature=0)
    assert r.choices[0].text == GREEDY_TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(GREEDY_TEXT) + 1


def test_prompt_forms_and_choice_indexes(client, engine):
    ids = engine.tokenizer.encode("abc")
    for prompt, num_prompts in (("abc", 1), (["abc", "de"], 2), (ids, 1), ([ids, ids[:2]], 2)):
        r = client.completions.create(model="fake-model", prompt=prompt, n=2, max_tokens=3, seed=1)
        assert sorted(c.index for c in r.choices) == list(range(2 * num_prompts))
    r = client.completions.create(model="fake-model", prompt=["abc", "de"], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6


def test_seeded_sampling_is_reproducible_and_choices_differ(client):
    def run(seed):
        r = client.completions.create(model="fake-model", prompt="x", n=3, max_tokens=8, seed=seed)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    assert run(7) == run(7)
    assert len(set(run(7))) > 1
    assert all(t in SAMPLE_TEXT * 3 for t in run(7))


def test_echo_with_text_and_token_prompts(client, engine):
    r = client.completions.create(model="fake-model", prompt="Say: ", echo=True, max_tokens=3, temperature=0)
    assert r.choices[0].text == "Say: " + GREEDY_TEXT[:3]
    ids = engine.tokenizer.encode("Say: ")
    r = client.completions.create(model="fake-model", prompt=ids, echo=True, max_tokens=3, temperature=0)
    assert r.choices[0].text == "Say: " + GREEDY_TEXT[:3]


def test_logprobs(client):
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == list(GREEDY_TEXT[:4])
    assert lp.token_logprobs == [-0.25] * 4
    assert lp.text_offset == [0, 1, 2, 3]
    assert all(len(top) == 2 and top[tok] == -0.25 for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True))


def test_echo_with_logprobs_includes_the_prompt(client):
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=2, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["H", "i", "H", "e"]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1] == -0.25
    assert lp.text_offset == [0, 1, 2, 3]


def test_return_tokens_as_token_ids(serve):
    server, engine = serve(return_tokens_as_token_ids=True)
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    r = c.completions.create(model="fake-model", prompt="Hi", max_tokens=1, temperature=0, logprobs=0)
    assert r.choices[0].logprobs.tokens == [f"token_id:{engine.tokenizer.convert_tokens_to_ids('H')}"]


def test_stop_strings_and_stop_token_ids(client, engine):
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=50, temperature=0, stop=["am a"])
    assert r.choices[0].text == "Hello! I "
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == "am a"
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=50, temperature=0, stop="I",
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == "Hello! I"
    bang = engine.tokenizer.convert_tokens_to_ids("!")
    r = client.completions.create(model="fake-model", prompt="Hi", max_tokens=50, temperature=0,
                                  extra_body={"stop_token_ids": [bang]})
    assert r.choices[0].text == "Hello"
    assert r.choices[0].stop_reason == bang


def test_extra_sampling_params_reach_the_engine(client, engine):
    client.completions.create(
        model="fake-model", prompt="Hi", max_tokens=30, temperature=0.5, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"5": 2.0}, user="u1",
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2, "ignore_eos": True,
                    "skip_special_tokens": False, "spaces_between_special_tokens": False,
                    "allowed_token_ids": [5, 6, 7], "truncate_prompt_tokens": 1, "prompt_logprobs": 1},
    )
    ids, p = engine.requests[-1]
    assert len(ids) == 1  # truncated to the last token
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos) == (5, 0.1, 1.2, 2, True)
    assert (p.temperature, p.top_p, p.seed, p.presence_penalty, p.frequency_penalty) == (0.5, 0.9, 3, 0.5, 0.25)
    assert p.logit_bias == {5: 2.0} and p.allowed_token_ids == [5, 6, 7] and p.prompt_logprobs == 1
    assert not p.skip_special_tokens and not p.spaces_between_special_tokens


def test_default_max_tokens_is_16(client, engine):
    client.completions.create(model="fake-model", prompt="Hi", extra_body={"ignore_eos": True})
    assert engine.requests[-1][1].max_tokens == 16


def _stream_texts(stream):
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


@pytest.mark.parametrize("prompt", ["Hi", ["Hi", "Yo"]])
def test_stream_concatenates_to_the_whole_text(client, prompt):
    kwargs = dict(model="fake-model", prompt=prompt, n=2, max_tokens=12, seed=11, stop=["fox"], echo=True)
    whole = client.completions.create(**kwargs)
    texts, finish, usage = _stream_texts(client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()


def test_stream_continuous_usage(http):
    body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(line.startswith("data: ") for line in lines)
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3]
    assert chunks[-1]["choices"] == []


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "suffix": "x"}, "suffix"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "Hi", "min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"prompt": "Hi", "stop_token_ids": [10**6]}, "token ids"),
    ({"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "Hi", "best_of": 1, "n": 2}, "best_of"),
    ({"prompt": "Hi", "n": 2**63}, "n"),  # each sequence is made on arrival: a huge n ate the memory
    ({"prompt": "Hi", "n": 2, "best_of": 129}, "best_of"),
    ({"prompt": "Hi", "use_beam_search": True, "n": 11}, "n"),  # 22 candidates > --max-logprobs 20
    ({"prompt": "Hi", "use_beam_search": True, "best_of": 11}, "best_of"),
    ({"prompt": "Hi", "guided_regex": "a+"}, "guided_regex"),
    ({"prompt": "Hi", "guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ({"prompt": "Hi", "guided_json": "{not json"}, "guided_json"),
    ({"prompt": "Hi", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "Hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({}, "prompt"),
])
def test_bad_requests_are_400_and_name_the_parameter(http, body, param):
    r = http.post("/v1/completions", json={"model": "fake-model", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "BadRequestError" and error["code"] == 400
    assert error["message"]
    assert http.get("/health").status_code == 200


def test_context_length_error_has_both_numbers(http):
    r = http.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * 500, "max_tokens": 20})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "512" in message and "520" in message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="Hi")
    assert info.value.body["param"] == "model"


def test_malformed_json_is_400(http):
    r = http.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_nan_and_huge_seed_are_400(http):
    raw = b'{"model": "fake-model", "prompt": "Hi", "temperature": NaN}'
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/completions", json={"model": "fake-model", "prompt": "Hi", "seed": 2**70})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/completions", json={"model": "fake-model", "prompt": "Hi", "max_tokens": 1, "new_thing": 1})
    assert r.status_code == 200
