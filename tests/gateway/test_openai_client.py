"""The official openai client against the gateway over the fake engine, in process."""

from __future__ import annotations

import anyio
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import gateway
from tests.gateway.fake_engine import REASONING, WORDS, FakeEngine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # asyncio only: under trio the openai client leaves its SSE generators to the garbage collector, which
    # trio reports as a ResourceWarning (an error here). test_errors and test_disconnect run under trio.
    return "asyncio"

USER = [{"role": "user", "content": "say some words"}]
PROMPT_TOKENS = 2 + 3  # the fake counts 2 per message plus its words
ANSWER = "".join(w + " " for w in (WORDS * 2)[:12])
THINKING = "".join(w + " " for w in REASONING)


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-r1"]
    assert models.data[0].model_extra == {"max_model_len": 256}
    model = await client.models.retrieve("fake-r1")
    assert model.id == "fake-r1" and model.owned_by == "ksdk"


async def test_model_id_override(engine: FakeEngine) -> None:
    app = gateway.create_app(engine, model_id="my-model")  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        client = openai.AsyncOpenAI(api_key="x", base_url="http://t/v1", http_client=http, max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == ["my-model"]
        reply = await client.chat.completions.create(model="my-model", messages=USER)  # type: ignore[arg-type]
        assert reply.model == "my-model"


async def test_chat_non_stream(client: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    reply = await client.chat.completions.create(model="fake-r1", messages=USER)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "fake-r1" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    assert choice.finish_reason == "stop" and choice.logprobs is None
    extra = choice.message.model_extra or {}
    assert extra["reasoning_content"] == THINKING and extra["reasoning"] == THINKING
    usage = reply.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (PROMPT_TOKENS, 15, PROMPT_TOKENS + 15)
    assert engine.state.name == "RUNNING" and engine.start_calls == 1  # started lazily by the first request


async def test_chat_stream_chunks_as_openai_sends_them(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="fake-r1", messages=USER, stream=True,  # type: ignore[arg-type]
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].finish_reason is None
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks if c.choices)
    assert content == ANSWER and reasoning == THINKING
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_ends_with_done_and_no_usage_unless_asked(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json={"messages": USER, "stream": True, "max_tokens": 5})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in r.text
    assert '"finish_reason":"length"' in events[-2]


async def test_max_tokens_gives_length(client: openai.AsyncOpenAI) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        reply = await client.chat.completions.create(model="fake-r1", messages=USER, **{key: 5})  # type: ignore[call-overload]
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 5
        assert reply.choices[0].message.content == "alpha beta "


async def test_n_and_seed(client: openai.AsyncOpenAI) -> None:
    async def ask(seed: int) -> list[str]:
        reply = await client.chat.completions.create(model="fake-r1", messages=USER, n=2, seed=seed,  # type: ignore[arg-type]
                                                     temperature=1.0)
        assert [c.index for c in reply.choices] == [0, 1]
        assert reply.usage.completion_tokens == 30
        return [c.message.content or "" for c in reply.choices]

    first = await ask(7)
    assert first == await ask(7)
    assert first != await ask(8)
    assert first[0] != first[1]


async def test_n_stream_interleaves_indices(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="fake-r1", messages=USER, n=2, stream=True,  # type: ignore[arg-type]
                                                  max_tokens=6)
    texts = {0: "", 1: ""}
    finishes = {}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: "alpha beta gamma ", 1: "alpha beta gamma "}
    assert finishes == {0: "length", 1: "length"}


async def test_stop_strings(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="fake-r1", messages=USER, stop=["gamma", "zzz"])  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "alpha beta "
    assert reply.choices[0].finish_reason == "stop"
    reply = await client.chat.completions.create(model="fake-r1", messages=USER, stop="delta")  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "alpha beta gamma "


async def test_logprobs(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="fake-r1", messages=USER, logprobs=True,  # type: ignore[arg-type]
                                                 top_logprobs=2, max_tokens=5)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert content[-1].token == "beta " and content[-1].logprob == -0.25
    assert content[-1].bytes == list(b"beta ")
    assert [t.token for t in content[-1].top_logprobs] == ["alpha", "beta"]


async def test_sampling_fields_reach_the_engine(client: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    await client.chat.completions.create(
        model="fake-r1", messages=USER, temperature=0.5, top_p=0.9, presence_penalty=0.5,  # type: ignore[arg-type]
        frequency_penalty=-0.5, seed=3, stop="x", max_tokens=4, user="u1", metadata={"k": "v"},
        response_format={"type": "text"}, tool_choice="none",
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
    )
    kind, _, sampling = engine.calls[-1]
    assert kind == "chat"
    assert sampling == {"temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                        "seed": 3, "stop": ("x",), "max_tokens": 4, "top_k": 5, "min_p": 0.1,
                        "repetition_penalty": 1.1}


async def test_messages_pass_as_given_with_content_parts_flattened(client: openai.AsyncOpenAI,
                                                                   engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    await client.chat.completions.create(model="fake-r1", messages=messages)  # type: ignore[arg-type]
    _, sent, _ = engine.calls[-1]
    assert sent == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one\ntwo"},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


async def test_completions(client: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    reply = await client.completions.create(model="fake-r1", prompt="once upon", max_tokens=3)
    assert reply.object == "text_completion" and reply.choices[0].text == "alpha beta gamma "
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 3)  # type: ignore[union-attr]
    assert engine.calls[-1][:2] == ("generate", "once upon")

    reply = await client.completions.create(model="fake-r1", prompt=[5, 6, 7], max_tokens=2)
    assert engine.calls[-1][:2] == ("generate", [5, 6, 7]) and reply.usage.prompt_tokens == 3  # type: ignore[union-attr]


async def test_completions_arrays_of_prompts_with_n(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="fake-r1", prompt=["a", "b c"], n=2, max_tokens=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.text == "alpha beta " for c in reply.choices)
    assert reply.usage.prompt_tokens == 1 + 2 and reply.usage.completion_tokens == 8  # type: ignore[union-attr]
    reply = await client.completions.create(model="fake-r1", prompt=[[1, 2], [3]], max_tokens=1)
    assert len(reply.choices) == 2 and reply.usage.prompt_tokens == 3  # type: ignore[union-attr]


async def test_completions_stream_with_logprobs_and_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(model="fake-r1", prompt="hi", max_tokens=3, stream=True,
                                             logprobs=1, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert "".join(c.choices[0].text for c in text_chunks) == "alpha beta gamma "
    offsets = [c.choices[0].logprobs.text_offset[0] for c in text_chunks]  # type: ignore[union-attr,index]
    assert offsets == [0, 6, 11]
    assert text_chunks[0].choices[0].logprobs.top_logprobs == [{"alpha": -0.5}]  # type: ignore[union-attr]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3  # type: ignore[union-attr]


async def test_mounted_under_a_prefix_starts_the_engine_once(engine: FakeEngine) -> None:
    parent = Starlette(routes=[Mount("/llm", app=gateway.create_app(engine))])  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(parent), base_url="http://t") as http:
        client = openai.AsyncOpenAI(api_key="x", base_url="http://t/llm/v1", http_client=http, max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == ["fake-r1"]
        replies = []

        async def ask() -> None:
            replies.append(await client.chat.completions.create(model="fake-r1", messages=USER))  # type: ignore[arg-type]

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(ask)
        assert len(replies) == 4 and engine.start_calls == 1
        assert (await http.get("/llm/health")).json() == {"status": "ok", "model": "fake-r1"}
        r = await http.get("/llm/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_parent_lifespan_helper_starts_and_closes(engine: FakeEngine) -> None:
    parent = Starlette(routes=[Mount("/llm", app=gateway.create_app(engine))],  # type: ignore[arg-type]
                       lifespan=gateway.lifespan(engine))  # type: ignore[arg-type]
    async with parent.router.lifespan_context(parent):
        assert engine.state.name == "RUNNING"
    assert engine.state.name == "CLOSED"
