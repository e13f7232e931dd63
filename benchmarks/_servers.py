"""Server processes for the peer comparison: start, wait for /health, sample memory, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_pids(pid: int) -> list[int]:
    """pid and its descendants, from /proc (children of every thread)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="utf-8") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples the summed RSS of a process tree; also keeps each process's own peak (VmHWM)."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_kib = 0
        self.hwm_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        pids = _tree_pids(self.pid)
        self.peak_rss_kib = max(self.peak_rss_kib, sum(_status_kib(p, "VmRSS") for p in pids))
        for p in pids:
            self.hwm_kib[p] = max(self.hwm_kib.get(p, 0), _status_kib(p, "VmHWM"))

    def stop(self) -> dict[str, float]:
        self.sample()
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_sampled_mib": self.peak_rss_kib / 1024,
            "sum_of_process_peaks_mib": sum(self.hwm_kib.values()) / 1024,
            "num_processes": len(self.hwm_kib),
        }


@dataclass
class Server:
    """A peer server: how to start it and what every request needs on top of the common body."""

    name: str
    command: list[str]
    port: int
    extra_body: dict[str, Any] = field(default_factory=dict)
    ignore_eos: bool = True  # send vLLM's `ignore_eos`; else extra_body suppresses EOS itself
    env: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    process: subprocess.Popen[bytes] | None = None
    memory: MemorySampler | None = None
    startup_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 900.0) -> None:
        log = open(self.log_path or os.devnull, "wb")  # noqa: SIM115 (closed with the process)
        begin = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env}, start_new_session=True,
        )
        self.memory = MemorySampler(self.process.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    self.startup_s = time.perf_counter() - begin
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)  # polling a child process's readiness
        self.stop()
        raise RuntimeError(f"{self.name} was not healthy after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> dict[str, float]:
        memory = self.memory.stop() if self.memory else {}
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return memory
