"""A small real HTTP server for tests that play an OpenAI-compatible endpoint."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JsonHandler(BaseHTTPRequestHandler):
    """Answers GET with a one-model list and records every POST body in `bodies`; subclasses
    answer POSTs with `send_json` (or their own stream)."""

    bodies: list[dict[str, Any]] = []

    def do_GET(self) -> None:  # noqa: N802
        self.send_json({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def read_body(self) -> dict[str, Any]:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        return body

    def send_json(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[JsonHandler]) -> Iterator[str]:
    """Run `handler` on a free local port in a thread; yields the base URL."""
    handler.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
