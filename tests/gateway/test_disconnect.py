"""A client that goes away aborts its engine request: driven at the ASGI level, so the disconnect is exact."""

from __future__ import annotations

import anyio
import pytest

import gateway
from tests.gateway.asgi_client import Client, scope
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


async def test_disconnect_mid_stream_aborts_and_frees_pages() -> None:
    engine = FakeEngine(token_delay=0.01, answer_tokens=1000, max_model_len=4096)
    app = gateway.create_app(engine)  # type: ignore[arg-type]
    client = Client({"messages": [{"role": "user", "content": "go on"}], "stream": True, "n": 2})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope("/v1/chat/completions"), client.receive, client.send)
            await client.got_content.wait()
            assert sum(engine.pages.values()) == 4  # the request holds its pages while streaming
            client.gone.set()
    assert engine.pages == {} and engine.finished == 0
    assert engine.generated < 100  # it stopped soon after the disconnect, far from 2 × 1000 tokens
    assert app.state.gateway.in_flight == 0


async def test_disconnect_before_the_first_token_aborts_a_plain_request() -> None:
    engine = FakeEngine(token_delay=0.01, answer_tokens=1000, max_model_len=4096)
    app = gateway.create_app(engine)  # type: ignore[arg-type]
    client = Client({"messages": [{"role": "user", "content": "go on"}]})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope("/v1/chat/completions"), client.receive, client.send)
            while not engine.pages:
                await anyio.sleep(0.005)
            client.gone.set()
    assert engine.pages == {} and engine.finished == 0 and engine.generated < 100
    assert client.messages == []  # nobody to answer
    assert app.state.gateway.in_flight == 0


async def test_disconnect_aborts_every_prompt_of_a_completion() -> None:
    engine = FakeEngine(token_delay=0.01, answer_tokens=1000, max_model_len=4096)
    app = gateway.create_app(engine)  # type: ignore[arg-type]
    client = Client({"prompt": ["a", "b", "c"], "stream": True, "max_tokens": 900})
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope("/v1/completions"), client.receive, client.send)
            while len(engine.pages) < 3:
                await anyio.sleep(0.005)
            client.gone.set()
    assert engine.pages == {} and engine.finished == 0
