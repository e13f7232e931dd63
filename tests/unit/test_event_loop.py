"""The API server and the bench client run on uvloop's event loop where it is installed."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tessera.api import event_loop


async def _running_loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is a dependency on Linux and macOS only")
def test_coroutines_run_on_uvloop():
    import uvloop

    assert event_loop.run(_running_loop_type()) is uvloop.Loop


def test_asyncio_runs_them_without_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    loop_type = event_loop.run(_running_loop_type())
    assert issubclass(loop_type, asyncio.AbstractEventLoop)
    assert loop_type.__module__.startswith("asyncio")
