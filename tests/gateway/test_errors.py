"""Every error status, as an OpenAI error object; refused fields named; a malformed-input sweep."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import openai
import pytest

import gateway
from tests.gateway.fake_engine import FakeEngine, FakeState
from tests.gateway.asgi_client import scope

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-r1", "messages": USER, **fields}


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None,
                 mentions: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    if mentions is not None:
        assert mentions in err["message"], err
    return err


async def test_api_key(engine: FakeEngine) -> None:
    app = gateway.create_app(engine, api_key="s3cret")  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")):
                r = await http.request(method, path, headers=headers, json=chat())
                err = assert_error(r, 401, code="invalid_api_key")
                assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/health")).status_code in (200, 503)  # health needs no key
        client = openai.AsyncOpenAI(api_key="s3cret", base_url="http://t/v1", http_client=http, max_retries=0)
        assert (await client.chat.completions.create(model="fake-r1", messages=USER)).choices  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError):
            bad = openai.AsyncOpenAI(api_key="nope", base_url="http://t/v1", http_client=http, max_retries=0)
            await bad.models.list()


async def test_unknown_model_is_404(http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
    assert_error(await http.post("/v1/chat/completions", json=chat(model="gpt-4")), 404, code="model_not_found",
                 param="model", mentions="fake-r1")
    assert_error(await http.post("/v1/completions", json={"model": "x", "prompt": "a"}), 404, code="model_not_found")
    assert_error(await http.get("/v1/models/gpt-4"), 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4")


async def test_unknown_path_and_method(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/v1/embeddings"), 404, code="not_found")
    assert_error(await http.get("/v1/chat/completions"), 405, code="method_not_allowed")


async def test_body_too_large_is_413(engine: FakeEngine) -> None:
    app = gateway.create_app(engine, max_body_bytes=200)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        big = chat(messages=[{"role": "user", "content": "x" * 300}])
        assert_error(await http.post("/v1/chat/completions", json=big), 413, code="request_too_large")

        # no Content-Length, the body in pieces: the limit is counted while reading
        pieces = [{"type": "http.request", "body": b" " * 150, "more_body": True},
                  {"type": "http.request", "body": json.dumps(chat()).encode(), "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return pieces.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope("/v1/chat/completions"), receive, send)
        assert sent[0]["status"] == 413 and b"request_too_large" in sent[1]["body"]
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
    (json.dumps(chat(temperature="hot")).encode(), "temperature"),
    (json.dumps(chat(n=1.5)).encode(), "n"),
    (json.dumps(chat(stream="yes")).encode(), "stream"),
    (json.dumps(chat(stop=[1, 2])).encode(), "stop"),
    (json.dumps({"model": "fake-r1"}).encode(), "messages"),
    (json.dumps(chat(messages="hi")).encode(), "messages"),
    (json.dumps(chat(messages=[{"role": 1, "content": "a"}])).encode(), "messages[0].role"),
    (json.dumps(chat(messages=[{"role": "user", "content": 5}])).encode(), "messages[0].content"),
    (json.dumps(chat(tools=[{"type": "function"}])).encode(), "tools[0]"),
    (json.dumps(chat(tools=[{"type": "function", "function": {}}])).encode(), "tools[0].function.name"),
    (json.dumps(chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}])).encode(),
     "parameters"),
])
async def test_bad_json_or_types_are_422(http: httpx.AsyncClient, body: bytes, param: str | None) -> None:
    r = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422, param=param)


@pytest.mark.parametrize("fields, param, code", [
    ({"frobnicate": 1}, "frobnicate", "unknown_field"),
    ({"temperature": 5}, "temperature", "invalid_value"),
    ({"n": 0}, "n", "invalid_value"),
    ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "invalid_value"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", "unsupported_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tool_choice",
     "unsupported_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": False},
     "parallel_tool_calls", "unsupported_value"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
    ({"logit_bias": {"5": 1}}, "logit_bias", "unsupported_field"),
    ({"store": True}, "store", "unsupported_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"stream": True, "stream_options": {"chunked": True}}, "stream_options.chunked", "unknown_field"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "unsupported_value"),
    ({"messages": [{"role": "user", "content": "a", "audio": {}}]}, "messages[0].audio", "unknown_field"),
    ({"messages": [{"role": "wizard", "content": "a"}]}, None, "invalid_value"),  # the engine refuses it
    ({"max_tokens": 10_000}, "messages", "context_length_exceeded"),
])
async def test_refused_values_are_400_naming_the_field(http: httpx.AsyncClient, fields: dict[str, Any],
                                                       param: str | None, code: str) -> None:
    r = await http.post("/v1/chat/completions", json=chat(**fields))
    err = assert_error(r, 400, code=code, param=param)
    if code == "unknown_field":
        assert repr(param.rsplit(".", 1)[-1]) in err["message"] or param in err["message"]  # type: ignore[union-attr]


@pytest.mark.parametrize("fields, param", [
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 21}, "top_logprobs"),
    ({"prompt": []}, "prompt"),
    ({"messages": USER}, "messages"),
])
async def test_completion_refusals(http: httpx.AsyncClient, fields: dict[str, Any], param: str) -> None:
    r = await http.post("/v1/completions", json={"model": "fake-r1", "prompt": "a", **fields})
    assert_error(r, 400, param=param)


async def test_completion_prompt_types(http: httpx.AsyncClient) -> None:
    for prompt in (5, [1.5], [[]], [{"a": 1}], None):
        r = await http.post("/v1/completions", json={"model": "fake-r1", "prompt": prompt})
        assert_error(r, 422, param="prompt")


async def test_busy_engine_is_429(http: httpx.AsyncClient, engine: FakeEngine, client: openai.AsyncOpenAI) -> None:
    await client.models.list()
    engine.busy = True
    for stream in (False, True):
        r = await http.post("/v1/chat/completions", json=chat(stream=stream))
        err = assert_error(r, 429, code="engine_busy")
        assert err["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="fake-r1", messages=USER)  # type: ignore[arg-type]


async def test_concurrency_limit_is_429() -> None:
    engine = FakeEngine(token_delay=0.01, answer_tokens=40)
    app = gateway.create_app(engine, max_concurrency=1)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        first: list[httpx.Response] = []

        async def slow() -> None:
            first.append(await http.post("/v1/chat/completions", json=chat(stream=True)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            with anyio.fail_after(5):
                while not engine.pages:
                    await anyio.sleep(0.005)
            r = await http.post("/v1/chat/completions", json=chat())
            assert_error(r, 429, code="too_many_concurrent_requests")
            assert (await http.get("/v1/models")).status_code == 200  # only generation takes a slot
        assert first[0].status_code == 200 and first[0].text.endswith("data: [DONE]\n\n")
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200  # the slot came back
        metrics = (await http.get("/metrics")).text
        assert 'ksdk_gateway_requests_rejected_total{model="fake-r1",reason="concurrency"} 1' in metrics


async def test_closed_engine_is_503(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.state = FakeState.CLOSED
    err = assert_error(await http.post("/v1/chat/completions", json=chat()), 503, code="engine_not_ready")
    assert err["type"] == "service_unavailable"
    r = await http.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "closed"


async def test_engine_closing_between_check_and_request_is_503(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    await engine.start()
    original = engine.stream

    def close_then_stream(*args: Any, **kwargs: Any) -> Any:
        engine.state = FakeState.CLOSED
        return original(*args, **kwargs)

    engine.stream = close_then_stream  # type: ignore[method-assign]
    assert_error(await http.post("/v1/chat/completions", json=chat(stream=True)), 503, code="engine_closed")


async def test_health_is_503_until_started(http: httpx.AsyncClient, engine: FakeEngine, anyio_backend: str) -> None:
    r = await http.get("/health")
    if anyio_backend == "asyncio":  # the start runs as a task; under trio /health awaits it
        assert r.status_code == 503 and r.json() == {"status": "starting", "model": "fake-r1"}
    with anyio.fail_after(5):  # /health began the lazy start
        while (await http.get("/health")).status_code != 200:
            await anyio.sleep(0.01)
    assert engine.start_calls == 1


async def test_metrics(http: httpx.AsyncClient) -> None:
    await http.post("/v1/chat/completions", json=chat())
    r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    assert '# TYPE ksdk_pages_used gauge' in lines and 'ksdk_pages_used{model="fake-r1"} 0' in lines
    assert '# TYPE ksdk_requests_finished_total counter' in lines
    assert 'ksdk_requests_finished_total{model="fake-r1"} 1' in lines
    assert 'ksdk_generation_tokens_total{model="fake-r1"} 15' in lines
    assert 'ksdk_generation_tokens_per_s{model="fake-r1"} 2.5' in lines
    assert 'ksdk_gateway_requests_in_flight{model="fake-r1"} 0' in lines


MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b""),
    ("/v1/chat/completions", b"null"),
    ("/v1/chat/completions", b'"a string"'),
    ("/v1/chat/completions", b"{" * 5000),
    ("/v1/chat/completions", b'{"messages": [null]}'),
    ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [null]}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": -1}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": true}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "seed": "1"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "stop": [""]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "stream_options": 3}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "response_format": "json"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "model": 7}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "user": 7}'),
    ("/v1/completions", b'{"prompt": [[1, "a"]]}'),
    ("/v1/completions", b'{"prompt": "a", "logprobs": true}'),
    ("/v1/completions", b'{"prompt": "a", "max_tokens": 0}'),
    ("/v1/completions", b'{"prompt": "a", "stop_token_ids": [-1]}'),
    ("/v1/completions", "\u2603".encode("utf-16")),
]


async def test_malformed_input_sweep_gets_4xx_and_server_keeps_serving(http: httpx.AsyncClient) -> None:
    for path, body in MALFORMED:
        r = await http.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert (await http.post("/v1/chat/completions", json=chat(max_tokens=2))).status_code == 200


def test_create_app_refuses_bad_settings(engine: FakeEngine) -> None:
    for kwargs in ({"api_key": ""}, {"max_body_bytes": 0}, {"max_concurrency": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            gateway.create_app(engine, **kwargs)  # type: ignore[arg-type]


async def test_an_error_after_the_stream_started_is_an_error_event(http: httpx.AsyncClient,
                                                                   engine: FakeEngine) -> None:
    engine.token_delay, engine.answer_tokens = 0.01, 1000
    responses: list[httpx.Response] = []

    async def ask() -> None:
        responses.append(await http.post("/v1/chat/completions", json=chat(stream=True)))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            while not engine.pages:
                await anyio.sleep(0.005)
            await anyio.sleep(0.05)
            engine.abort(next(iter(engine.pages)))  # as the engine does when it shuts down under a request
    r = responses[0]
    assert r.status_code == 200  # the status was sent with the first chunk
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "request_aborted" and error["type"] == "service_unavailable"


def test_public_names() -> None:
    assert gateway.__all__ == sorted(gateway.__all__)
    assert all(hasattr(gateway, name) for name in gateway.__all__)
