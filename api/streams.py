"""Async plumbing of the serving layer: client-disconnect watching, merging engine streams, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request

from tessera.core.outputs import RequestOutput

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_for_disconnect(raw_request: Request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(work: Awaitable[T], raw_request: Request | None) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client goes away first."""
    task = asyncio.ensure_future(work)
    if raw_request is None:
        return await task
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()


async def prime(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput | None]:
    """The first output of each generator: errors the engine raises before its first yield
    (invalid parameters, a full queue) become HTTP errors instead of broken streams."""

    async def first(gen: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        try:
            return await gen.__anext__()
        except StopAsyncIteration:
            return None

    return list(await asyncio.gather(*(first(g) for g in gens)))


async def merge(
    firsts: list[RequestOutput | None], gens: list[AsyncIterator[RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they come, tagged with the prompt index."""
    for i, first in enumerate(firsts):
        if first is not None:
            yield i, first
    if len(gens) == 1:
        if firsts[0] is not None and not firsts[0].finished:
            async for output in gens[0]:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in gen:
                await queue.put((i, output, None))
        except Exception as exc:  # handed to the consumer
            await queue.put((i, None, exc))
        await queue.put((i, None, None))

    pending = [i for i, first in enumerate(firsts) if first is not None and not first.finished]
    tasks = [asyncio.ensure_future(pump(i, gens[i])) for i in pending]
    try:
        remaining = len(tasks)
        while remaining:
            i, output, exc = await queue.get()
            if exc is not None:
                raise exc
            if output is None:
                remaining -= 1
                continue
            yield i, output
    finally:
        for task in tasks:
            task.cancel()


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def close_all(gens: list[AsyncIterator[Any]]) -> None:
    with anyio.CancelScope(shield=True):
        for gen in gens:
            aclose: Callable[[], Awaitable[None]] | None = getattr(gen, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
