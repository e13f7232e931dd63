"""torch.compile of the model's forward: same tokens as eager, attention through the custom op."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_compiling_does_not_import_triton_and_leaves_it_importable(tmp_path):
    # Triton (a GPU compiler, here because xgrammar depends on it) costs ~150 MB once imported;
    # Dynamo imports it if it can, and Inductor too when it compiles a graph it has not cached. A
    # fresh process with an empty compile cache shows whether compiling kept it out.
    pytest.importorskip("triton")
    path = save_model(tmp_path / "tiny")
    script = (
        "import sys\n"
        "from tessera import LLM\n"
        f"llm = LLM({str(path)!r}, dtype='float32', block_size=8)\n"
        "assert llm.engine.runner.compile_seconds is not None\n"
        "print('triton imported:', 'triton' in sys.modules)\n"
        "import triton\n"
        "print('importable afterwards')\n"
    )
    env = {**os.environ, "TESSERA_ENFORCE_EAGER": "0", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton imported: False" in result.stdout
    assert "importable afterwards" in result.stdout
