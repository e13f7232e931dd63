"""Fixtures for the server tests: a live uvicorn server on 127.0.0.1 over the fake engine."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fake_engine import FakeEngine

from tessera.api.server import build_app
from tessera.api.server_config import ServerConfig


class LiveServer:
    """Serves an app from a thread. The socket is bound and listening before the thread starts,
    so clients may connect at once (the backlog holds them until uvicorn accepts)."""

    def __init__(self, app: Any, **uvicorn_kwargs: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.is_ssl = "ssl_certfile" in uvicorn_kwargs
        config = uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_kwargs)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.is_ssl else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


ServeFn = Callable[..., tuple[LiveServer, FakeEngine]]


@pytest.fixture
def serve() -> Iterator[ServeFn]:
    """serve(engine=None, uvicorn=None, **server_config) -> (server, engine); stopped after the test."""
    servers: list[LiveServer] = []

    def start(engine: FakeEngine | None = None, uvicorn_kwargs: dict[str, Any] | None = None,
              **config: Any) -> tuple[LiveServer, FakeEngine]:
        engine = engine or FakeEngine()
        config.setdefault("served_model_names", ("fake-model",))
        app = build_app(engine, ServerConfig(**config))
        server = LiveServer(app, **(uvicorn_kwargs or {}))
        servers.append(server)
        return server, engine

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live(serve: ServeFn) -> tuple[LiveServer, FakeEngine]:
    return serve()


@pytest.fixture
def http(live: tuple[LiveServer, FakeEngine]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live[0].url, timeout=30) as client:
        yield client


@pytest.fixture
def engine(live: tuple[LiveServer, FakeEngine]) -> FakeEngine:
    return live[1]


@pytest.fixture
def client(live: tuple[LiveServer, FakeEngine]) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{live[0].url}/v1", api_key="unused", max_retries=0, timeout=30)
