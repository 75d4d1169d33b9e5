"""Fixtures: a fake engine, the gateway app over it, and clients that drive the app in process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from starlette.applications import Starlette

import gateway
from tests.gateway.fake_engine import FakeEngine


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # the engine runs under both


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine: FakeEngine) -> Starlette:
    return gateway.create_app(engine)  # type: ignore[arg-type]


@pytest.fixture
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        yield client


@pytest.fixture
async def client(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0)
