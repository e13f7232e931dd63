"""nox sessions over the project's own .venv (create it with `bash scripts/setup.sh`).

nox -s lint typecheck tests
nox -s bench -- throughput --num-prompts 16
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "none"

BIN = ".venv/bin/"


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    session.run(BIN + "pytest", "-q", *session.posargs, external=True)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run(BIN + "ruff", "check", ".", external=True)
    session.run(BIN + "ruff", "format", "--check", ".", external=True)


@nox.session(python=False)
def typecheck(session: nox.Session) -> None:
    session.run(BIN + "mypy", external=True)  # the files listed in pyproject's [tool.mypy]


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    session.run(
        BIN + "tessera",
        "bench",
        *(session.posargs or ["throughput", "--num-prompts", "16"]),
        external=True,
    )
