"""``create_app``: the engine as an OpenAI-compatible Starlette app, mountable under any prefix."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request

from gateway import routes
from gateway.errors import APIError, api_error_handler, http_exception_handler

if TYPE_CHECKING:
    import ksdk

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_CONCURRENCY", "GatewayState", "create_app", "lifespan"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 64


@dataclasses.dataclass
class GatewayState:
    """What the routes share: the engine, the guards' settings and their counters."""

    engine: ksdk.Engine
    model_id: str
    api_key: str | None
    max_body_bytes: int
    max_concurrency: int
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))  # reported by /v1/models
    in_flight: int = 0
    rejected: Counter[str] = dataclasses.field(default_factory=Counter)
    _start_lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)
    _start_task: asyncio.Task[None] | None = None

    @property
    def engine_state(self) -> str:
        return self.engine.state.name  # CREATED, RUNNING, CLOSED or FAILED

    async def ensure_running(self) -> None:
        """Start the engine on first use: a mounted app gets no lifespan events of its own."""
        if self.engine_state == "CREATED":
            async with self._start_lock:
                if self.engine_state == "CREATED":
                    logger.info("starting the engine on the first request")
                    await self.engine.start()
        if self.engine_state != "RUNNING":
            raise APIError(503, f"the engine is not running (state {self.engine_state})",
                           type="service_unavailable", code="engine_not_ready")

    async def begin_start(self) -> None:
        """Begin a lazy start without waiting for it, so ``/health`` can answer 503 meanwhile.

        Under asyncio the start runs as a task; under another event loop (trio) it is awaited here.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            await self._start_quietly()
            return
        if self._start_task is None or self._start_task.done():
            self._start_task = loop.create_task(self._start_quietly())

    async def _start_quietly(self) -> None:
        try:
            await self.ensure_running()
        except Exception:  # reported by /health as the engine's state; the next request sees it too
            logger.exception("the engine failed to start")

    def check_api_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            self.rejected["unauthorized"] += 1
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def acquire_slot(self) -> Callable[[], None]:
        """Take one of ``max_concurrency`` generation slots, or refuse with 429; returns the release."""
        if self.in_flight >= self.max_concurrency:
            self.rejected["concurrency"] += 1
            raise APIError(429, f"too many concurrent requests (limit {self.max_concurrency}); retry later",
                           type="rate_limit_error", code="too_many_concurrent_requests")
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release


def lifespan(engine: ksdk.Engine, *, close: bool = True) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """A Starlette ``lifespan`` that starts ``engine`` with the parent app and, if ``close``, closes it after.

    Use it on the app you mount the gateway into: ``Starlette(routes=[Mount("/llm", app)],
    lifespan=gateway.lifespan(engine))``. Without it the engine starts on the first request.
    """

    @contextlib.asynccontextmanager
    async def _lifespan(app: Starlette) -> AsyncIterator[None]:
        if engine.state.name == "CREATED":
            await engine.start()
        try:
            yield
        finally:
            if close:
                await engine.aclose()

    return _lifespan


def create_app(
    engine: ksdk.Engine,
    *,
    model_id: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    close_engine: bool = False,
) -> Starlette:
    """Serve ``engine`` as an OpenAI-compatible API.

    ``model_id`` is the id clients must name (default ``engine.model_id``). With ``api_key`` every route but
    ``/health`` needs ``Authorization: Bearer <api_key>``. Bodies over ``max_body_bytes`` get 413; generation
    requests beyond ``max_concurrency`` at once get 429. Run alone, the app starts the engine at startup (and
    closes it at shutdown when ``close_engine``); mounted, it starts the engine on the first request.
    """
    if api_key is not None and not api_key:
        raise ValueError("api_key: an empty key would accept anyone; pass None for no key")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: got {max_body_bytes}, allowed: an integer >= 1")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency: got {max_concurrency}, allowed: an integer >= 1")
    state = GatewayState(engine=engine, model_id=model_id or engine.model_id, api_key=api_key,
                         max_body_bytes=max_body_bytes, max_concurrency=max_concurrency)
    app = Starlette(
        routes=routes.build_routes(),
        exception_handlers={APIError: api_error_handler, HTTPException: http_exception_handler},
        lifespan=lifespan(engine, close=close_engine),
    )
    app.state.gateway = state
    return app
