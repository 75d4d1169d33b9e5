"""The gateway over the real engine on a tiny random-weight DeepSeek-V3 model, through the openai client.

One engine serves the whole module (loading the tiny GGUF takes seconds); every test runs in its loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import openai
import pytest

import gateway
from ksdk.engine import Engine  # the lead exports it as ksdk.Engine; this import works before and after
from ksdk.testing import tiny_gguf
from tests.gateway.serving import uvicorn_in_loop
from tests.gateway.asgi_client import Client, scope

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[Engine]:
    async with Engine.from_gguf(tiny_gguf(), model_id="tiny") as engine:
        yield engine


@pytest.fixture
async def http(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    app = gateway.create_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        yield client


@pytest.fixture
def client(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="x", base_url="http://t/v1", http_client=http, max_retries=0)


async def test_models(client: openai.AsyncOpenAI, engine: Engine) -> None:
    (model,) = (await client.models.list()).data
    assert model.id == "tiny" and (model.model_extra or {})["max_model_len"] == engine.max_model_len


async def test_chat_matches_the_engine(client: openai.AsyncOpenAI, engine: Engine) -> None:
    direct = await engine.chat(USER, max_tokens=8, temperature=0)
    reply = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=8,  # type: ignore[arg-type]
                                                 temperature=0)
    message = reply.choices[0].message
    assert (message.content, (message.model_extra or {}).get("reasoning_content", "")) == (direct.text,
                                                                                           direct.reasoning)
    assert direct.reasoning  # the tiny model's template opens <think>: its text arrives as reasoning
    assert reply.choices[0].finish_reason == direct.finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (direct.usage.prompt_tokens, 8)

    stream = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=8,  # type: ignore[arg-type]
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "")
                        for c in chunks if c.choices)
    assert reasoning == direct.reasoning
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


async def test_n_seed_and_logprobs(client: openai.AsyncOpenAI) -> None:
    async def ask(seed: int) -> Any:
        return await client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, n=2,  # type: ignore[arg-type]
                                                    seed=seed, temperature=1.0, logprobs=True, top_logprobs=3)

    first, again = await ask(11), await ask(11)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 8
    assert [c.message.model_extra for c in first.choices] == [c.message.model_extra for c in again.choices]
    for choice in first.choices:
        assert len(choice.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in choice.logprobs.content)


async def test_completions_stop_and_token_ids(client: openai.AsyncOpenAI, engine: Engine) -> None:
    full = await client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12 and len(text) > 8  # type: ignore[union-attr]
    stop = text[4:7]
    cut = await client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                          stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"

    ids = engine.tokenizer.encode("Once upon a time", add_bos=True)
    by_ids = await client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text and by_ids.usage.prompt_tokens == len(ids)  # type: ignore[union-attr]

    two = await client.completions.create(model="tiny", prompt=["Once upon a time", "Hello"], max_tokens=3,
                                          temperature=0, logprobs=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 6  # type: ignore[union-attr]
    assert all(len(c.logprobs.tokens) == 3 for c in two.choices)  # type: ignore[union-attr,arg-type]


async def test_engine_errors_map_to_statuses(http: httpx.AsyncClient, engine: Engine) -> None:
    r = await http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": engine.max_model_len})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = await http.post("/v1/completions", json={"prompt": [10**9], "max_tokens": 2})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = await http.get("/metrics")
    assert r.status_code == 200 and 'ksdk_requests_finished_total{model="tiny"}' in r.text


async def test_disconnect_frees_the_pages(engine: Engine) -> None:
    app = gateway.create_app(engine)
    baseline = engine.stats().pages_used
    client = Client({"messages": USER, "stream": True, "max_tokens": 1000})
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope("/v1/chat/completions"), client.receive, client.send)
            while sum(m.get("body", b"").count(b"reasoning_content") for m in client.messages) < 3:
                await anyio.sleep(0.01)
            assert engine.stats().pages_used > baseline
            client.gone.set()
        while engine.stats().pages_used != baseline:
            await anyio.sleep(0.01)
    assert engine.stats().running == 0


async def test_through_uvicorn(engine: Engine) -> None:
    app = gateway.create_app(engine, api_key="k")
    async with uvicorn_in_loop(app) as url:
        client = openai.AsyncOpenAI(api_key="k", base_url=f"{url}/v1", max_retries=0, timeout=30)
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        stream = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, stream=True)  # type: ignore[arg-type]
        finishes = [c.choices[0].finish_reason async for c in stream if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        await client.close()
    assert engine.state.name == "RUNNING"  # the app did not own the engine: still running


async def test_tools_reach_the_chat_template(client: openai.AsyncOpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    plain = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)  # type: ignore[arg-type]
    try:
        with_tools = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,  # type: ignore[arg-type]
                                                          tools=tools)
    except openai.BadRequestError:
        return  # refused with a clear 400: honest too
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the template described the tool
    assert with_tools.choices[0].finish_reason == "length"
