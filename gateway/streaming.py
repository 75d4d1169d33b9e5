"""One generation request as an ASGI response: engine streams in, SSE or JSON out, a disconnect aborts.

The response owns the request's whole life: it opens the engine streams, waits for the first event before it
commits to a status (so a busy engine or a too-long prompt is a 429/400, not a broken 200 stream), watches
the client for ``http.disconnect`` the whole time (also during prefill, when nothing is sent), and on any
exit aborts the engine requests that have not finished, which frees their KV pages.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

import ksdk
from gateway.errors import APIError, error_body, error_response, from_engine_error
from gateway.renderers import Renderer
from gateway.schemas import ChoiceState, UsageTally

__all__ = ["EngineResponse", "Source"]

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # ask reverse proxies not to buffer the stream
]


@dataclasses.dataclass(frozen=True)
class Source:
    """One engine request of an HTTP request (completions with a list of prompts have several)."""

    prompt_index: int
    first_index: int  # the response's choice index of this source's choice 0
    request_id: str
    open: Callable[[], AsyncIterator[ksdk.StreamEvent]]


Item = tuple[Source, "ksdk.StreamEvent | Exception"]


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class EngineResponse:
    """An ASGI app answering one generation request from its engine sources."""

    def __init__(self, sources: list[Source], renderer: Renderer, *, stream: bool,
                 abort: Callable[[str], None], on_close: Callable[[], None]) -> None:
        self.sources = sources
        self.renderer = renderer
        self.stream = stream
        self._abort = abort
        self._on_close = on_close
        self._finished: set[str] = set()  # request ids whose engine stream ended on its own

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._run(scope, receive, send)
        finally:
            for source in self.sources:
                if source.request_id not in self._finished:
                    self._abort(source.request_id)
            self._on_close()

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        items_in, items_out = anyio.create_memory_object_stream[Item](max_buffer_size=math.inf)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
            async with items_in:
                for source in self.sources:
                    tg.start_soon(self._pump, source, items_in.clone())
            try:
                if self.stream:
                    await self._send_stream(items_out, scope, receive, send)
                else:
                    await self._send_body(items_out, scope, receive, send)
            except OSError:  # the server reports a send to a closed connection this way
                logger.info("client went away while being answered")
            tg.cancel_scope.cancel()

    async def _watch_disconnect(self, receive: Receive, scope: anyio.abc.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        logger.info("client disconnected; aborting %s", ", ".join(s.request_id for s in self.sources))
        scope.cancel()

    async def _pump(self, source: Source, out: MemoryObjectSendStream[Item]) -> None:
        async with out:
            try:
                async for event in source.open():
                    await out.send((source, event))
            except Exception as exc:  # every failure reaches the client as an error object
                await out.send((source, exc))
            else:
                self._finished.add(source.request_id)

    @staticmethod
    def _error_of(item: ksdk.StreamEvent | Exception) -> APIError | None:
        if isinstance(item, ksdk.KsdkError):
            return from_engine_error(item)
        if isinstance(item, Exception):
            logger.error("unexpected error while generating", exc_info=item)
            return APIError(500, "internal error while generating", type="internal_error", code="internal_error")
        if item.finish_reason == "abort":
            return APIError(503, "the engine aborted the request (it is shutting down)",
                            type="service_unavailable", code="request_aborted")
        return None

    async def _send_body(self, items: MemoryObjectReceiveStream[Item], scope: Scope, receive: Receive,
                         send: Send) -> None:
        choices: dict[int, ChoiceState] = collections.defaultdict(ChoiceState)
        tally = UsageTally()
        async with items:
            async for source, item in items:
                if (err := self._error_of(item)) is not None:
                    await error_response(err)(scope, receive, send)
                    return
                assert isinstance(item, ksdk.StreamEvent)
                choices[source.first_index + item.index].add(item)
                if item.usage is not None:
                    tally.add(source.prompt_index, item.usage)
        await JSONResponse(self.renderer.body(choices, tally))(scope, receive, send)

    async def _send_stream(self, items: MemoryObjectReceiveStream[Item], scope: Scope, receive: Receive,
                           send: Send) -> None:
        tally = UsageTally()
        started = False
        async with items:
            async for source, item in items:
                if (err := self._error_of(item)) is not None:
                    if not started:  # nothing sent yet: answer with the right status
                        await error_response(err)(scope, receive, send)
                        return
                    await send({"type": "http.response.body", "body": _sse(error_body(err)), "more_body": True})
                    break
                assert isinstance(item, ksdk.StreamEvent)
                if not started:
                    started = True
                    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                    await self._send_chunks(send, self.renderer.opening())
                await self._send_chunks(send, self.renderer.on_event(source.first_index + item.index, item))
                if item.usage is not None:
                    tally.add(source.prompt_index, item.usage)
            else:
                if not started:
                    raise RuntimeError("the engine ended a stream without any event")
                if self.renderer.include_usage:
                    await self._send_chunks(send, [self.renderer.usage_chunk(tally)])
        await send({"type": "http.response.body", "body": _sse("[DONE]"), "more_body": False})

    @staticmethod
    async def _send_chunks(send: Send, chunks: list[dict[str, Any]]) -> None:
        if chunks:
            body = b"".join(_sse(c) for c in chunks)
            await send({"type": "http.response.body", "body": body, "more_body": True})
