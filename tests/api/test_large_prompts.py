"""A long prompt is tokenized off the event loop: other requests are answered meanwhile."""

from __future__ import annotations

import threading

import httpx
import pytest

from tessera.api.serving_common import OFF_LOOP_PROMPT_CHARS

LONG = "x" * (OFF_LOOP_PROMPT_CHARS + 1)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "fake-model", "prompt": LONG}),
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": LONG}]}),
    ("/tokenize", {"model": "fake-model", "prompt": LONG}),
    ("/tokenize", {"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": LONG}]}]}),
])
def test_the_server_answers_while_a_long_prompt_is_tokenized(live, path, body):
    server, engine = live
    tokenizer = engine.tokenizer
    encode = tokenizer.encode
    started, release = threading.Event(), threading.Event()

    def held_encode(text, *args, **kwargs):
        if len(text) > OFF_LOOP_PROMPT_CHARS:
            started.set()
            release.wait(timeout=20)  # on the event loop this would hold every request
        return encode(text, *args, **kwargs)

    tokenizer.encode = held_encode
    answers: list[httpx.Response] = []
    long_request = threading.Thread(target=lambda: answers.append(httpx.post(server.url + path, json=body, timeout=60)))
    long_request.start()
    try:
        assert started.wait(timeout=20)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        release.set()
        long_request.join(timeout=60)
    # the long prompt itself is still answered: a 400 past the context, or its tokens
    assert answers and answers[0].status_code in (200, 400), answers[0].text
