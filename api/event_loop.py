"""The event loop the API server and the bench client run on: uvloop's where it is installed.

uvloop is a dependency on Linux and macOS (pyproject.toml), as it is of `uvicorn[standard]`,
which vLLM installs. The API process's work while streaming is mostly the event loop's (a wake-up
and a socket write per token of every stream), and on a machine whose cores the engine also uses,
every CPU-second it spends is taken from the engine: with uvloop a 32-stream decode run costs the
API process 15-25% less CPU (docs/benchmarks.md). Elsewhere asyncio's own loop runs everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the loop above."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
