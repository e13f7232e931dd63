"""torch.compile of the model's forward: same tokens as eager, attention through the custom op."""

from __future__ import annotations

import pytest
from fixtures_models import save_model
from torch._dynamo.utils import counters

from tessera import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture
def compiling(monkeypatch):
    monkeypatch.setenv("TESSERA_ENFORCE_EAGER", "0")


def _generate(path, prompts, **kwargs):
    llm = LLM(str(path), dtype="float32", seed=0, block_size=8, **kwargs)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    return llm, [o.outputs[0].token_ids for o in outputs]


def test_compiled_forward_matches_eager(tmp_path, compiling):
    path = save_model(tmp_path / "tiny")
    # one lone decode, a small batch, a big prefill, and prompts sharing a prefix (chunks on a cached prefix)
    prompts = [[5], [3, 9, 2, 7], list(range(10, 70)), list(range(10, 40)) + [1, 2, 3]]
    eager_llm, eager = _generate(path, prompts, enforce_eager=True)
    assert eager_llm.engine.runner.compile_seconds is None
    counters.clear()
    compiled_llm, compiled = _generate(path, prompts)
    assert compiled_llm.engine.runner.compile_seconds is not None
    assert compiled == eager
    # the whole forward is one graph per size class: attention did not break it
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1


def test_two_compiled_engines_in_one_process_keep_their_own_code(tmp_path, compiling):
    # Dynamo's checks on the modules are dropped for speed (core/worker/compilation.py); what keeps
    # the second model from running the first one's compiled code is that each engine has its own
    # torch.compile. The models differ in structure (biases), which only the dropped checks see.
    prompts = [[5], [3, 9, 2, 7], list(range(10, 30))]
    paths = [save_model(tmp_path / "a"), save_model(tmp_path / "b", attention_bias=True, mlp_bias=True)]
    expected = [_generate(path, prompts, enforce_eager=True)[1] for path in paths]
    assert expected[0] != expected[1]
    assert [_generate(path, prompts)[1] for path in paths] == expected
