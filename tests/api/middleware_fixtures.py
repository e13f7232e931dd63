"""Middleware importable by --middleware in tests: one function, one class."""

from __future__ import annotations

from typing import Any


async def add_function_header(request: Any, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers["x-function-middleware"] = "yes"
    return response


class AddClassHeader:
    """A pure ASGI middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-class-middleware", b"yes")]
            await send(message)

        await self.app(scope, receive, send_with_header)
