"""The shipped examples run on the embedded default model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_offline_generate_example_answers_paris():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "offline_generate.py")],
        capture_output=True, text=True, timeout=600, cwd="/tmp",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    chat_line = next(line for line in result.stdout.splitlines() if line.startswith("chat:"))
    assert "Paris" in chat_line
    assert result.stdout.count("->") == 4  # two prompts x n=2
