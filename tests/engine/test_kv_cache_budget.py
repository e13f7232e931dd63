"""How the engine sizes the KV cache from the platform's budget and the model's full length."""

from __future__ import annotations

import pytest
from fixtures_models import save_model

from tessera import LLM
from tessera.core.errors import ConfigError

MAX_LEN = 4096
BLOCK = 16


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("kv") / "tiny", max_position_embeddings=MAX_LEN)


def test_a_default_budget_below_one_full_length_sequence_grows_to_hold_it(model_path):
    # the default cap is far below one sequence of this model's full length: the engine still
    # starts, with exactly enough blocks for one such sequence
    llm = LLM(model_path, dtype="float32", block_size=BLOCK, kv_cache_default_max_gib=1e-6)
    assert llm.engine.kv_cache_manager.num_blocks == MAX_LEN // BLOCK


def test_a_budget_the_user_set_below_one_full_length_sequence_is_refused(model_path):
    with pytest.raises(ConfigError, match="fewer than max_model_len"):
        LLM(model_path, dtype="float32", block_size=BLOCK, kv_cache_space_gib=1e-6)
