"""Engine events rendered as OpenAI bodies: stream chunks and whole responses, for chat and completions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import ksdk
from gateway.schemas import ChoiceState, UsageTally, chat_logprobs, completion_logprobs, usage_body
from gateway.tool_calls import ToolCallStream, split_tool_calls

__all__ = ["ChatRenderer", "CompletionRenderer", "Renderer"]

JSON = dict[str, Any]


class Renderer(Protocol):
    num_choices: int
    include_usage: bool

    def opening(self) -> list[JSON]: ...
    def on_event(self, index: int, event: ksdk.StreamEvent) -> list[JSON]: ...
    def body(self, choices: Mapping[int, ChoiceState], tally: UsageTally) -> JSON: ...
    def usage_chunk(self, tally: UsageTally) -> JSON: ...


class _Base:
    chunk_object_name = ""

    def __init__(self, request_id: str, created: int, model: str, num_choices: int, include_usage: bool) -> None:
        self.request_id = request_id
        self.created = created
        self.model = model
        self.num_choices = num_choices
        self.include_usage = include_usage

    def _envelope(self, obj: str, choices: list[JSON]) -> JSON:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def _chunk(self, choice: JSON) -> JSON:
        chunk = self._envelope(self.chunk_object_name, [choice])
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last when usage was asked for
        return chunk

    def usage_chunk(self, tally: UsageTally) -> JSON:
        chunk = self._envelope(self.chunk_object_name, [])
        chunk["usage"] = usage_body(tally)
        return chunk


class ChatRenderer(_Base):
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, created: int, model: str, num_choices: int, include_usage: bool,
                 with_logprobs: bool, parse_tool_calls: bool = False) -> None:
        super().__init__(request_id, created, model, num_choices, include_usage)
        self.with_logprobs = with_logprobs
        self.parse_tool_calls = parse_tool_calls  # only when the request offered tools
        self._tool_streams: dict[int, ToolCallStream] = {}

    def _choice(self, index: int, delta: JSON, finish_reason: str | None = None,
                logprobs: JSON | None = None) -> JSON:
        return self._chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

    def opening(self) -> list[JSON]:
        return [self._choice(i, {"role": "assistant", "content": ""}) for i in range(self.num_choices)]

    def on_event(self, index: int, event: ksdk.StreamEvent) -> list[JSON]:
        text = event.text
        tools = self._tool_streams.setdefault(index, ToolCallStream()) if self.parse_tool_calls else None
        if tools is not None:
            text = tools.feed(text)
        delta: JSON = {}
        if event.reasoning:
            delta["reasoning_content"] = event.reasoning
            delta["reasoning"] = event.reasoning
        if text:
            delta["content"] = text
        logprobs = chat_logprobs(event.logprobs) if self.with_logprobs and event.logprobs else None
        chunks = []
        if delta or logprobs:
            chunks.append(self._choice(index, delta or {"content": ""}, logprobs=logprobs))
        if event.finish_reason is None:
            return chunks
        calls: list[JSON] = []
        if tools is not None:
            rest, calls = tools.finish()
            if rest:
                chunks.append(self._choice(index, {"content": rest}))
            if calls:
                chunks.append(self._choice(index, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}))
        chunks.append(self._choice(index, {}, finish_reason=_finish_reason(event.finish_reason, calls)))
        return chunks

    def body(self, choices: Mapping[int, ChoiceState], tally: UsageTally) -> JSON:
        out = self._envelope("chat.completion", [self._whole_choice(i, state) for i, state in sorted(choices.items())])
        out["usage"] = usage_body(tally)
        return out

    def _whole_choice(self, index: int, state: ChoiceState) -> JSON:
        content, calls = "".join(state.text), []
        if self.parse_tool_calls:
            content, calls = split_tool_calls(content)
        message: JSON = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = calls
        _add_reasoning(message, state)
        return {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(state.logprobs) if self.with_logprobs else None,
            "finish_reason": _finish_reason(state.finish_reason, calls),
        }


def _finish_reason(engine_reason: str | None, calls: list[JSON]) -> str | None:
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


def _add_reasoning(message: JSON, state: ChoiceState) -> None:
    if state.reasoning:
        reasoning = "".join(state.reasoning)
        message["reasoning_content"] = reasoning  # DeepSeek's name
        message["reasoning"] = reasoning  # the name newer OpenAI-compatible clients read


class CompletionRenderer(_Base):
    chunk_object_name = "text_completion"

    def __init__(self, request_id: str, created: int, model: str, num_choices: int, include_usage: bool,
                 top_logprobs: int | None) -> None:
        super().__init__(request_id, created, model, num_choices, include_usage)
        self.top_logprobs = top_logprobs  # None: no logprobs asked for
        self._text_offsets: dict[int, int] = {}

    def opening(self) -> list[JSON]:
        return []

    def on_event(self, index: int, event: ksdk.StreamEvent) -> list[JSON]:
        offset = self._text_offsets.get(index, 0)
        self._text_offsets[index] = offset + len(event.text)
        logprobs = None
        if self.top_logprobs is not None and event.logprobs:
            logprobs = completion_logprobs(event.logprobs, offset, self.top_logprobs > 0)
        chunks = []
        if event.text or logprobs:
            chunks.append(self._chunk({"index": index, "text": event.text, "logprobs": logprobs,
                                       "finish_reason": None}))
        if event.finish_reason is not None:
            chunks.append(self._chunk({"index": index, "text": "", "logprobs": None,
                                       "finish_reason": event.finish_reason}))
        return chunks

    def body(self, choices: Mapping[int, ChoiceState], tally: UsageTally) -> JSON:
        out = self._envelope("text_completion", [
            {
                "index": i,
                "text": "".join(state.text),
                "logprobs": (completion_logprobs(state.logprobs, 0, self.top_logprobs > 0)
                             if self.top_logprobs is not None else None),
                "finish_reason": state.finish_reason,
            }
            for i, state in sorted(choices.items())
        ])
        out["usage"] = usage_body(tally)
        return out
