"""The endpoints: models, chat completions, completions, health and metrics.

Order of checks for a generation request: API key (401) → body size (413) → JSON and field types (422) →
values and unsupported fields (400), model id (404) → concurrency slot (429) → engine running (503) → engine
errors (400/429/503) → 200. ``/health`` needs no key; everything else does when the app has one.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

import ksdk
from gateway.errors import APIError, from_engine_error
from gateway.metrics import CONTENT_TYPE, render_metrics
from gateway.renderers import ChatRenderer, CompletionRenderer
from gateway.schemas import parse_chat_request, parse_completion_request, parse_json_body
from gateway.streaming import EngineResponse, Source

T = TypeVar("T")

__all__ = ["build_routes"]


def _state(request: Request) -> Any:  # GatewayState; typed loosely to keep app → routes one-way
    return request.app.state.gateway


async def _read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    too_big = APIError(413, f"the request body is larger than the limit of {max_bytes} bytes",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async with contextlib.aclosing(request.stream()) as body:  # count while reading: Content-Length may lie
        async for chunk in body:
            size += len(chunk)
            if size > max_bytes:
                raise too_big
            chunks.append(chunk)
    return parse_json_body(b"".join(chunks))


def _model_card(state: Any) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "ksdk",
            "max_model_len": state.engine.max_model_len}


async def list_models(request: Request) -> Response:
    state = _state(request)
    state.check_api_key(request)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    state.check_api_key(request)
    model_id = request.path_params["model_id"]
    if model_id != state.model_id:
        raise APIError(404, f"the model {model_id!r} does not exist; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def _admit(request: Request, parse: Callable[[Any, str], T]) -> tuple[Any, T, Callable[[], None]]:
    """Authenticate, parse the body, take a concurrency slot and make sure the engine runs."""
    state = _state(request)
    state.check_api_key(request)
    parsed = parse(await _read_json(request, state.max_body_bytes), state.model_id)
    release = state.acquire_slot()
    try:
        await state.ensure_running()
    except BaseException:
        release()
        raise
    return state, parsed, release


async def chat_completions(request: Request) -> EngineResponse:
    state, chat, release = await _admit(request, parse_chat_request)
    engine, request_id = state.engine, f"chatcmpl-{uuid.uuid4().hex}"
    source = Source(0, 0, request_id, lambda: engine.stream(chat.messages, request_id=request_id, tools=chat.tools,
                                                           **chat.sampling))
    renderer = ChatRenderer(request_id, int(time.time()), state.model_id, chat.sampling.get("n", 1),
                            chat.include_usage, with_logprobs=chat.sampling.get("logprobs", False),
                            parse_tool_calls=chat.tools is not None)
    return EngineResponse([source], renderer, stream=chat.stream, abort=engine.abort, on_close=release)


async def completions(request: Request) -> EngineResponse:
    state, comp, release = await _admit(request, parse_completion_request)
    engine, request_id = state.engine, f"cmpl-{uuid.uuid4().hex}"
    n = comp.sampling.get("n", 1)

    def source(k: int, prompt: str | list[int]) -> Source:
        rid = request_id if len(comp.prompts) == 1 else f"{request_id}-{k}"
        return Source(k, k * n, rid, lambda: engine.generate(prompt, request_id=rid, **comp.sampling))

    top = comp.sampling.get("top_logprobs", 0) if comp.sampling.get("logprobs") else None
    renderer = CompletionRenderer(request_id, int(time.time()), state.model_id, n * len(comp.prompts),
                                  comp.include_usage, top_logprobs=top)
    return EngineResponse([source(k, p) for k, p in enumerate(comp.prompts)], renderer, stream=comp.stream,
                          abort=engine.abort, on_close=release)


async def health(request: Request) -> Response:
    state = _state(request)
    engine_state = state.engine_state
    if engine_state == "RUNNING":
        return JSONResponse({"status": "ok", "model": state.model_id})
    if engine_state == "CREATED":
        await state.begin_start()
        if state.engine_state == "RUNNING":  # it started right away
            return JSONResponse({"status": "ok", "model": state.model_id})
        return JSONResponse({"status": "starting", "model": state.model_id}, status_code=503)
    return JSONResponse({"status": engine_state.lower(), "model": state.model_id}, status_code=503)


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.check_api_key(request)
    try:
        stats = state.engine.stats()
    except ksdk.KsdkError as exc:
        raise from_engine_error(exc) from exc
    text = render_metrics(stats, state.model_id, state.in_flight, state.rejected)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


def build_routes() -> list[BaseRoute]:
    # The generation endpoints return an EngineResponse: an ASGI app like a Response, that owns the request.
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
