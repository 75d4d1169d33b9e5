"""DeepSeek tool-call text → OpenAI tool_calls: the parser, and the openai client over the fake engine."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.tool_calls import ToolCallStream, split_tool_calls
from tests.gateway.fake_engine import FakeEngine, tool_call_pieces

V3 = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
      '{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
V31 = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
       "<｜tool▁calls▁end｜>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "weather in Paris?"}]


def names_and_args(calls: list[dict]) -> list[tuple[str, object]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("section, expected", [
    (V3, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (V31, [("get_weather", {"city": "Paris"})]),
])
def test_split_both_formats(section: str, expected: list) -> None:
    content, calls = split_tool_calls("Checking. " + section)
    assert content == "Checking. " and names_and_args(calls) == expected
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("text", ["no calls here", V3[:-10], V3.replace("<｜tool▁sep｜>", "")])
def test_text_that_is_not_a_complete_section_stays_content(text: str) -> None:
    assert split_tool_calls(text) == (text, [])


@pytest.mark.parametrize("cut", [1, 5, 11, 30])
def test_stream_holds_back_the_section_even_with_a_marker_split_across_deltas(cut: int) -> None:
    text = "Checking. " + V3
    at = text.index("<｜tool▁calls▁begin｜>") + cut
    stream = ToolCallStream()
    shown = stream.feed(text[:at]) + stream.feed(text[at:])
    rest, calls = stream.finish()
    assert shown == "Checking. " and rest == "" and len(calls) == 2


def test_stream_passes_plain_text_and_returns_a_broken_section_as_text() -> None:
    stream = ToolCallStream()
    assert stream.feed("a <｜") == "a "  # may be a marker: held
    assert stream.feed("not a marker") == "<｜not a marker"
    assert stream.feed("<｜tool▁calls▁begin｜>oops") == ""
    assert stream.finish() == ("<｜tool▁calls▁begin｜>oops", [])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_tool_call_through_the_openai_client(client: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    reply = await client.chat.completions.create(model="fake-r1", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert engine.tools_seen[-1] == TOOLS
    assert reply.usage.completion_tokens == 3 + len(tool_call_pieces("get_weather"))  # type: ignore[union-attr]

    stream = await client.chat.completions.create(model="fake-r1", messages=ASK, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check. " and "tool▁" not in content
    assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather")]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.anyio
async def test_tool_choice_none_hides_the_tools_and_history_passes_through(client: openai.AsyncOpenAI,
                                                                           engine: FakeEngine) -> None:
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    reply = await client.chat.completions.create(model="fake-r1", messages=history, tools=TOOLS,  # type: ignore[arg-type]
                                                 tool_choice="none")
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None
    assert engine.tools_seen[-1] is None and engine.calls[-1][1] == history
