"""How the frontend drives an EngineCore: in a thread of this process, or in its own process over ZMQ."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import pickle
import queue
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from tessera.core.config import EngineConfig
from tessera.core.engine.client import EngineStats, ModelInfo
from tessera.core.engine.types import EngineCoreOutput
from tessera.core.errors import TesseraError

logger = logging.getLogger(__name__)

# How tessera's processes log (`tessera serve` sets it up in the API process; the engine-core
# process repeats it at the level its parent had, so its start-up and warnings show too).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Called (on the thread that owns the client) with one step's outputs and the core's stats.
OutputHandler = Callable[[list[EngineCoreOutput], EngineStats], None]

# Commands sent to the core loop: ("add", [EngineCoreRequest]), ("abort", [ids]),
# ("finish", [ids]), ("shutdown", None).
Command = tuple[str, Any]


def _apply_command(core: Any, command: Command, refused: list[EngineCoreOutput]) -> bool:
    """Apply one command to an EngineCore; False on shutdown. Refused requests go to `refused`."""
    kind, payload = command
    if kind == "add":
        for request in payload:
            output = core.add_request(request)
            if output is not None:
                refused.append(output)
    elif kind == "abort":
        core.abort_requests(payload)
    elif kind == "finish":
        core.finish_requests(payload)
    elif kind == "shutdown":
        return False
    return True


def run_core_loop(core: Any, next_command: Callable[[bool], Command | None], emit: OutputHandler) -> None:
    """The engine loop: apply pending commands, step while there is work, block when idle.

    `next_command(block)` returns the next command, or None when none is pending (block=False).
    """
    while True:
        idle = not core.has_unfinished_requests()
        command = next_command(idle)
        refused: list[EngineCoreOutput] = []
        while command is not None:
            if not _apply_command(core, command, refused):
                return
            command = next_command(False)
        outputs = core.step() if core.has_unfinished_requests() else []
        emit(refused + outputs, core.stats())


class InprocCoreClient:
    """Runs the EngineCore loop in a daemon thread of this process."""

    def __init__(self, config: EngineConfig, on_outputs: OutputHandler, on_dead: Callable[[str], None]) -> None:
        from tessera.core.engine.engine_core import EngineCore

        self._core = EngineCore(config)
        self.model_info: ModelInfo = self._core.model_info
        self.initial_stats = self._core.stats()
        self._commands: queue.Queue[Command] = queue.Queue()
        self._on_outputs = on_outputs
        self._on_dead = on_dead
        self._thread = threading.Thread(target=self._run, name="tessera-engine-core", daemon=True)
        self._thread.start()

    def _next_command(self, block: bool) -> Command | None:
        try:
            return self._commands.get(block=block)
        except queue.Empty:
            return None

    def _run(self) -> None:
        try:
            run_core_loop(self._core, self._next_command, self._on_outputs)
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine core loop died")
            self._on_dead(f"engine core loop died: {exc!r}")

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._commands.put(("shutdown", None))
            self._thread.join(timeout=30)


def freeze_start_up_objects() -> None:
    """Take what start-up allocated (the model's modules, the tokenizer, imported libraries: ~300k
    objects for the default model) out of the garbage collector's reach. A full collection over them
    takes ~110 ms on 2 cores, a stalled step or request, and they live as long as the process.
    For the processes tessera owns (engine core, API server); a library user's process is theirs."""
    gc.collect()
    gc.freeze()


def _engine_process_main(config: EngineConfig, input_address: str, output_address: str, log_level: int) -> None:
    """Entry point of the engine-core process: build the core, report ready, loop."""
    import zmq

    logging.basicConfig(level=log_level, format=LOG_FORMAT)

    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.connect(output_address)
    try:
        from tessera.core.engine.engine_core import EngineCore
        from tessera.core.plugins import load_plugins_from_env, set_plugins

        set_plugins(load_plugins_from_env(config.plugin_modules))
        core = EngineCore(config)
        freeze_start_up_objects()
        outputs.send(pickle.dumps(("ready", (core.model_info, core.stats()))))
    except BaseException as exc:
        # A user's mistake (a bad flag value, a model that is not there) travels as itself, for
        # the frontend to raise and report in one line; anything else with its traceback.
        is_user_error = isinstance(exc, TesseraError)
        outputs.send(pickle.dumps(("error", exc if is_user_error else f"{exc!r}\n{traceback.format_exc()}")))
        context.destroy(linger=1000)
        raise SystemExit(1) from None

    parent = os.getppid()

    def next_command(block: bool) -> Command | None:
        # Checked at every step and every second while idle: an API process killed outright (no
        # "shutdown" sent) must not leave this process behind, holding the model and its cache.
        while not inputs.poll(1000 if block else 0):
            if os.getppid() != parent:
                logger.error("the API process (pid %d) is gone; the engine process exits", parent)
                return ("shutdown", None)
            if not block:
                return None
        return pickle.loads(inputs.recv())

    def emit(step_outputs: list[EngineCoreOutput], stats: EngineStats) -> None:
        outputs.send(pickle.dumps(("outputs", (step_outputs, stats))), copy=False)

    run_core_loop(core, next_command, emit)
    outputs.send(pickle.dumps(("stopped", None)))
    context.destroy(linger=1000)


class MultiprocCoreClient:
    """Runs the EngineCore in a child process; commands and outputs travel over ZMQ (IPC sockets)."""

    def __init__(self, config: EngineConfig, on_outputs: OutputHandler, on_dead: Callable[[str], None]) -> None:
        import zmq

        self._on_outputs = on_outputs
        self._on_dead = on_dead
        self._dir = tempfile.mkdtemp(prefix="tessera-")
        base = os.path.join(self._dir, uuid.uuid4().hex[:8])
        input_address, output_address = f"ipc://{base}-in", f"ipc://{base}-out"
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.bind(output_address)
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(
            target=_engine_process_main,
            args=(config, input_address, output_address, logging.getLogger().getEffectiveLevel()),
            name="tessera-engine-core", daemon=True,
        )
        self._process.start()
        try:
            self.model_info, self.initial_stats = self._wait_ready()
        except BaseException:
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
            self._close_transport()  # else the context's collection waits on its sockets forever
            raise
        self._send_lock = threading.Lock()
        self._stopping = False
        self._reader = threading.Thread(target=self._read_outputs, name="tessera-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> tuple[ModelInfo, EngineStats]:
        while True:
            if self._output.poll(500):
                kind, payload = pickle.loads(self._output.recv())
                if kind == "ready":
                    return payload
                self._process.join(timeout=10)
                if isinstance(payload, TesseraError):
                    raise payload
                raise RuntimeError(f"the engine process failed to start: {payload}")
            if not self._process.is_alive():
                raise RuntimeError(f"the engine process exited during start-up (code {self._process.exitcode})")

    def _read_outputs(self) -> None:
        while True:
            if self._output.poll(1000):
                kind, payload = pickle.loads(self._output.recv())
                if kind == "outputs":
                    self._on_outputs(*payload)
                elif kind == "stopped":
                    return
            elif not self._process.is_alive():
                if not self._stopping:
                    self._on_dead(f"the engine process died (exit code {self._process.exitcode})")
                return

    def send(self, command: Command) -> None:
        with self._send_lock:
            self._input.send(pickle.dumps(command))

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def shutdown(self) -> None:
        self._stopping = True
        if self._process.is_alive():
            self.send(("shutdown", None))
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._reader.join(timeout=5)
        self._close_transport()

    def _close_transport(self) -> None:
        self._context.destroy(linger=0)
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)
