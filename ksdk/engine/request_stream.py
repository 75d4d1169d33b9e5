"""The caller's side of one request: an async iterator of StreamEvents fed from the loop thread."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio

from ksdk.engine.llm_engine import StepOutput
from ksdk.outputs import StreamEvent

__all__ = ["Channel", "ReasoningSplitter", "RequestStream"]


class ReasoningSplitter(Protocol):
    """``ksdk.reasoning.ReasoningParser``'s shape: split text deltas into (reasoning, content)."""

    def feed(self, delta: str) -> tuple[str, str]: ...

    def finish(self) -> object: ...


class Channel:
    """A loop-thread-only queue: ``put`` from loop callbacks, ``get`` from the consuming task."""

    def __init__(self) -> None:
        self._items: deque[StepOutput] = deque()
        self._waiter: anyio.Event | None = None

    def put(self, item: StepOutput) -> None:
        self._items.append(item)
        if self._waiter is not None:
            self._waiter.set()

    async def get(self) -> StepOutput:
        while not self._items:
            self._waiter = anyio.Event()  # created in the consuming task, so it binds to its loop
            try:
                await self._waiter.wait()
            finally:
                self._waiter = None
        return self._items.popleft()


class RequestStream:
    """Iterate for events (``n`` choices interleave). Leaving early — ``break``, cancellation, ``aclose()``
    or dropping the object — aborts the request, and the engine frees its pages at the next step."""

    def __init__(self, request_id: str, n: int, channel: Channel, on_close: Callable[[str, bool], None],
                 make_splitter: Callable[[], ReasoningSplitter] | None = None) -> None:
        self.request_id = request_id
        self._channel = channel
        self._on_close = on_close  # (request_id, abort)
        self._open_choices = n
        self._done = False
        self._splitters = [make_splitter() for _ in range(n)] if make_splitter else None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._channel.get()
        except BaseException:  # cancelled while waiting: the request must not outlive its caller
            self._abandon()
            raise
        if out.error is not None:
            self._finish()
            raise out.error
        event = out.event
        assert event is not None
        if event.finish_reason is not None:
            self._open_choices -= 1
            if self._open_choices == 0:
                self._finish()
        return self._split(event) if self._splitters else event

    async def aclose(self) -> None:
        self._abandon()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._abandon()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._abandon()

    def _finish(self) -> None:
        self._done = True
        self._on_close(self.request_id, False)

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self._on_close(self.request_id, True)

    def _split(self, event: StreamEvent) -> StreamEvent:
        assert self._splitters is not None
        splitter = self._splitters[event.index]
        reasoning, content = splitter.feed(event.text)
        if event.finish_reason is not None:
            tail = splitter.finish()
            if isinstance(tail, tuple) and len(tail) == 2:
                reasoning, content = reasoning + tail[0], content + tail[1]
        return StreamEvent(event.request_id, event.index, content, event.token_ids, reasoning=reasoning,
                           logprobs=event.logprobs, finish_reason=event.finish_reason,
                           stop_reason=event.stop_reason, usage=event.usage)
