"""AsyncEngine: streaming deltas, abort, bounded queue and engine death, in-process and in a child process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
from fixtures_models import save_model

from tessera.core.config import engine_config_from_kwargs
from tessera.core.engine.async_engine import AsyncEngine
from tessera.core.errors import ConfigError, EngineDeadError, InvalidRequestError, QueueFullError
from tessera.core.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_model(str(tmp_path_factory.mktemp("tiny-llama-async")), "llama")


def _engine(model_dir: str, use_process: bool, **kwargs) -> AsyncEngine:
    config = engine_config_from_kwargs(model_dir, dtype="float32", num_blocks_override=64, **kwargs)
    return AsyncEngine(config, use_process=use_process)


async def _collect(engine: AsyncEngine, request_id: str, params: SamplingParams, prompt=(5, 6, 7, 8)):
    deltas = []
    async for output in engine.generate(list(prompt), params, request_id):
        deltas.append(output)
    return deltas


@pytest.mark.parametrize("use_process", [False, True], ids=["inproc", "process"])
def test_stream_abort_and_no_leak(model_dir, use_process):
    engine = _engine(model_dir, use_process)

    async def scenario():
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        deltas = await _collect(engine, "a", params)
        assert deltas[-1].finished
        tokens = [t for d in deltas for t in d.outputs[0].token_ids]
        assert len(tokens) == 10
        # n=2 streams both choices
        deltas = await _collect(engine, "b", SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=5, ignore_eos=True))
        assert {o.index for d in deltas for o in d.outputs} == {0, 1}
        # a consumer that walks away mid-stream aborts its request
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "c")
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            stats = engine.stats()
            if stats.num_used_blocks == 0 and stats.num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().num_used_blocks == 0
        await engine.check_health()

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown())


def test_full_queue_is_refused(model_dir):
    engine = _engine(model_dir, False, max_num_seqs=1, max_waiting_requests=1)

    async def scenario():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        first = engine.generate([5, 6], params, "1")
        second = engine.generate([5, 6], params, "2")
        await first.__anext__()
        await second.__anext__()
        with pytest.raises(QueueFullError):
            await engine.generate([5, 6], params, "3").__anext__()
        await first.aclose()
        await second.aclose()

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown())


def test_a_guided_constraint_is_checked_off_the_event_loop(model_dir):
    import threading

    from tessera.core.interfaces.guided import GuidedConstraint

    engine = _engine(model_dir, False)
    started, release = threading.Event(), threading.Event()
    waits: list[bool] = []

    def slow_check(constraint):  # a JSON-schema check can take seconds
        started.set()
        waits.append(release.wait(timeout=20))  # on the event loop, nothing would set `release`
        raise InvalidRequestError("rejected after the check", param="guided_json")

    engine.input_processor.guided_validator = slow_check

    async def scenario():
        params = SamplingParams(max_tokens=2, guided=GuidedConstraint("json", "{}"))
        task = asyncio.ensure_future(_collect(engine, "g", params))
        while not started.is_set():
            await asyncio.sleep(0.01)
        release.set()  # the loop runs while the check waits
        with pytest.raises(InvalidRequestError, match="rejected after the check"):
            await task
        assert waits == [True]

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown())


def test_a_bad_config_found_in_the_engine_process_is_raised_as_itself(model_dir):
    # the model's own limit is only known once the engine process has read it; the frontend
    # raises the same ConfigError, which `tessera serve` prints as one line (no tracebacks)
    with pytest.raises(ConfigError, match="larger than the model's maximum length"):
        _engine(model_dir, True, max_model_len=10**7)


def test_engine_process_death_is_reported(model_dir):
    engine = _engine(model_dir, True)

    async def scenario():
        os.kill(engine._client._process.pid, signal.SIGKILL)
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), "x")
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.check_health()

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown())


# A frontend that owns an engine process, prints that process's pid, then waits to be killed;
# "busy" has a request running (the tiny model takes seconds for its 250 tokens), so the engine
# is stepping when its parent dies.
_FRONTEND = """
import asyncio, sys
from tessera.core.config import engine_config_from_kwargs
from tessera.core.engine.async_engine import AsyncEngine
from tessera.core.sampling_params import SamplingParams

async def main():
    config = engine_config_from_kwargs(sys.argv[1], dtype="float32", num_blocks_override=64)
    engine = AsyncEngine(config, use_process=True)
    if sys.argv[2] == "busy":
        params = SamplingParams(max_tokens=250, ignore_eos=True)
        stream = engine.generate([5, 6, 7], params, "long")
        await stream.__anext__()
    print(engine._client._process.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_the_engine_process_exits_when_its_frontend_is_killed(model_dir, state):
    import subprocess
    import sys
    import time

    frontend = subprocess.Popen([sys.executable, "-c", _FRONTEND, model_dir, state], stdout=subprocess.PIPE, text=True)
    try:
        assert frontend.stdout is not None
        engine_pid = int(frontend.stdout.readline())
        frontend.kill()  # SIGKILL: no shutdown command reaches the engine
        frontend.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _is_running(engine_pid):
            time.sleep(0.2)
        assert not _is_running(engine_pid), "the engine process outlived its frontend"
    finally:
        frontend.kill()


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_beam_search_through_the_async_engine_equals_offline(model_dir):
    from tessera import LLM

    params = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0, max_tokens=5, ignore_eos=True)
    prompt = [5, 9, 17, 33, 65]
    (offline,) = LLM(model_dir, dtype="float32", num_blocks_override=64).generate([prompt], params)
    engine = _engine(model_dir, False)

    async def scenario():
        return [o async for o in engine.generate(prompt, params, "beam")]

    try:
        outputs = asyncio.run(scenario())
    finally:
        asyncio.run(engine.shutdown())
    assert len(outputs) == 1 and outputs[0].finished
    assert [c.token_ids for c in outputs[0].outputs] == [c.token_ids for c in offline.outputs]
    assert engine.stats().num_used_blocks == 0


def test_the_engine_process_logs_at_its_parents_level(model_dir, capfd):
    # `tessera serve` logs at INFO; the engine-core process follows, so its start-up line shows
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    try:
        engine = _engine(model_dir, use_process=True)
        asyncio.run(engine.shutdown())
    finally:
        root.setLevel(level)
    assert "INFO tessera.core.engine.engine_core: engine ready" in capfd.readouterr().err


def test_start_up_objects_are_kept_out_of_garbage_collection():
    # run in a child: freezing is process-wide, and the test process is not tessera's to freeze
    import subprocess
    import sys

    code = (
        "import gc\n"
        "from tessera.core.engine.core_client import freeze_start_up_objects\n"
        "start_up = [[i] for i in range(50_000)]\n"
        "freeze_start_up_objects()\n"
        "print(gc.get_freeze_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) > 50_000
