"""Session-scoped tiny random models (saved once per test session) for the engine tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from fixtures_models import save_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """`tiny_model_path(variant="llama", save_format="safetensors")` -> a folder, built on first use."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple[str, str], str] = {}

    def get(variant: str = "llama", save_format: str = "safetensors") -> str:
        key = (variant, save_format)
        if key not in built:
            built[key] = save_model(os.path.join(root, f"{variant}-{save_format}"), variant, save_format)
        return built[key]

    return get
