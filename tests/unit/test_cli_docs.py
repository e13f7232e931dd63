"""docs/cli.md is generated from the parser and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cli_docs_are_current():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_cli_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_cli_docs_name_every_flag():
    from tessera.api.args import UNSUPPORTED, build_parser, long_options

    docs = (REPO / "docs" / "cli.md").read_text()
    for flag in long_options(build_parser()):
        if not flag.startswith("--no-"):
            assert f"`{flag}`" in docs or f"`{flag} [BOOL]`" in docs, flag
    for row in UNSUPPORTED:
        assert f"| `{row.flag}` |" in docs
