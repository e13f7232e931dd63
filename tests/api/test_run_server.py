"""`serve(ns)` (what `tessera serve` runs) over the fake engine: SSL, YAML config, engine death."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine

from tessera.api import server as server_module
from tessera.api.args import parse_serve_args
from tessera.core.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """serve(ns) in a thread; stopped by killing the fake engine (the watchdog then exits 1)."""

    def __init__(self, ns, engine: FakeEngine, monkeypatch) -> None:
        async def fake_build_engine(_ns):
            return engine

        monkeypatch.setattr(server_module, "build_engine", fake_build_engine)
        self.engine = engine
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(ns,), daemon=True)
        self.thread.start()

    def _run(self, ns) -> None:
        self.exit_code = asyncio.run(server_module.serve(ns))

    def wait_healthy(self, url: str, **client_kwargs) -> None:
        """Wait for uvicorn to bind (it starts in another thread)."""
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2, **client_kwargs).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the server did not come up")
            time.sleep(0.05)

    def kill_engine_and_wait(self) -> int | None:
        self.engine.running = False
        self.thread.join(timeout=20)
        return self.exit_code


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return str(key), str(crt)


def test_ssl_and_exit_code_when_the_engine_dies(cert, monkeypatch):
    key, crt = cert
    port = _free_port()
    ns = parse_serve_args(["--host", "127.0.0.1", "--port", str(port), "--ssl-keyfile", key,
                           "--ssl-certfile", crt, "--served-model-name", "m"])
    running = Running(ns, FakeEngine(), monkeypatch)
    context = ssl.create_default_context(cafile=crt)
    running.wait_healthy(f"https://127.0.0.1:{port}", verify=context)
    r = httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=context)
    assert r.json()["data"][0]["id"] == "m"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert running.kill_engine_and_wait() == 1


def test_yaml_config(tmp_path: Path, monkeypatch):
    port = _free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f'host: "127.0.0.1"\nport: {port}\napi-key: "yaml-key"\nserved-model-name: ["a", "b"]\n'
        'response-role: "bot"\n'
    )
    ns = parse_serve_args(["--config", str(config)])
    running = Running(ns, FakeEngine(), monkeypatch)
    url = f"http://127.0.0.1:{port}"
    running.wait_healthy(url)
    assert httpx.get(f"{url}/v1/models").status_code == 401
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer yaml-key"},
                   json={"model": "b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200
    assert r.json()["model"] == "a" and r.json()["choices"][0]["message"]["role"] == "bot"
    assert running.kill_engine_and_wait() == 1


def test_a_port_in_use_fails_before_the_engine_starts(monkeypatch):
    built = []

    async def fake_build_engine(_ns):
        built.append(True)
        return FakeEngine()

    monkeypatch.setattr(server_module, "build_engine", fake_build_engine)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ns = parse_serve_args(["--host", "127.0.0.1", "--port", str(taken.getsockname()[1])])
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:.*in use"):
            asyncio.run(server_module.serve(ns))
    assert not built  # the model would have loaded for nothing
