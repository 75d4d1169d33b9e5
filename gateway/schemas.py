"""Request bodies parsed into engine calls, and engine results built into OpenAI response bodies.

Every field of a request is either honored or refused: an unknown field, or a known one whose value we
cannot honor yet (``response_format`` other than text, ``tool_choice: "required"``, ``echo``, ...), is a 400
that names it.
Wrong JSON types are 422. ``null`` counts as "not given" for every optional field.

``max_tokens`` not given means "until the context is full" for chat (OpenAI's meaning) and 16 for
completions (OpenAI's documented default there).

Harmless fields we accept and do not act on, because they carry no instruction for generation:
``user`` (an end-user id for the caller's own logs), ``metadata`` (tags for stored completions; we store
nothing) and ``store`` when false.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import ksdk
from gateway.errors import APIError

__all__ = [
    "ChatRequest",
    "ChoiceState",
    "CompletionRequest",
    "UsageTally",
    "chat_logprobs",
    "completion_logprobs",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json_body",
    "usage_body",
]

JSON = dict[str, Any]
HARMLESS_FIELDS = ("metadata", "store", "user")
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"})


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    messages: list[JSON]
    sampling: JSON  # SamplingParams keywords, already validated
    stream: bool
    include_usage: bool
    tools: list[JSON] | None  # shown to the model through its chat template; its calls come back as tool_calls


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str | list[int]]  # each prompt yields n choices, indices prompt_index * n + i
    sampling: JSON
    stream: bool
    include_usage: bool


def parse_json_body(raw: bytes) -> JSON:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(422, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise APIError(422, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_type")
    return body


# ---- field readers: 422 for a wrong type, 400 for a value we refuse ------------------------------------------

def _type_error(name: str, value: object, expected: str) -> APIError:
    return APIError(422, f"{name}: expected {expected}, got {json.dumps(value)[:80]}", param=name,
                    code="invalid_type")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read(body: JSON, name: str, check: Callable[[object], bool], expected: str) -> Any:
    value = body.get(name)
    if value is not None and not check(value):
        raise _type_error(name, value, expected)
    return value


def _read_int(body: JSON, name: str) -> int | None:
    return _read(body, name, _is_int, "an integer")


def _read_number(body: JSON, name: str) -> float | None:
    return _read(body, name, _is_number, "a number")


def _read_bool(body: JSON, name: str) -> bool | None:
    return _read(body, name, lambda v: isinstance(v, bool), "true or false")


def _refuse_unknown(body: JSON, known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known - set(HARMLESS_FIELDS))
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}; supported fields: {', '.join(sorted(known))}, and "
                       f"(accepted, no effect) {', '.join(HARMLESS_FIELDS)}", param=unknown[0],
                       code="unknown_field")
    _read(body, "user", lambda v: isinstance(v, str), "a string")
    _read(body, "metadata", lambda v: isinstance(v, dict), "an object")
    if _read_bool(body, "store"):
        raise APIError(400, "store: true is not supported (this server stores no completions)", param="store",
                       code="unsupported_value")


def _check_model(body: JSON, served_id: str) -> None:
    model = _read(body, "model", lambda v: isinstance(v, str), "a string")
    if model is not None and model != served_id:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_id!r}",
                       param="model", code="model_not_found")


def _read_stream(body: JSON) -> tuple[bool, bool]:
    stream = bool(_read_bool(body, "stream"))
    options = _read(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise APIError(400, f"stream_options.{unknown[0]} is not supported; supported: include_usage",
                       param=f"stream_options.{unknown[0]}", code="unknown_field")
    include = _read(options, "include_usage", lambda v: isinstance(v, bool), "true or false")
    return stream, bool(include)


def _read_common_sampling(body: JSON) -> JSON:
    """The sampling fields shared by chat and completions, as SamplingParams keywords (absent → default)."""
    out: JSON = {}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (v := _read_number(body, name)) is not None:
            out[name] = float(v)
    for name in ("top_k", "seed", "n", "min_tokens"):
        if (v := _read_int(body, name)) is not None:
            out[name] = v
    if (v := _read_bool(body, "ignore_eos")) is not None:
        out["ignore_eos"] = v
    stop = _read(body, "stop", lambda v: isinstance(v, str) or (isinstance(v, list) and
                 all(isinstance(s, str) for s in v)), "a string or a list of strings")
    if stop is not None:
        out["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    ids = _read(body, "stop_token_ids", lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
                "a list of integers")
    if ids is not None:
        out["stop_token_ids"] = tuple(ids)
    logit_bias = _read(body, "logit_bias", lambda v: isinstance(v, dict), "an object")
    if logit_bias:
        raise APIError(400, "logit_bias is not supported yet", param="logit_bias", code="unsupported_field")
    return out


def _validated(sampling: JSON) -> JSON:
    """Check the values once here, so a stream never starts with a bad parameter."""
    try:
        ksdk.SamplingParams.from_kwargs(**sampling)
    except ksdk.SamplingParamError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_value") from exc
    return sampling


# ---- chat -------------------------------------------------------------------------------------------------

CHAT_FIELDS = frozenset({
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "seed", "n",
    "logprobs", "top_logprobs", "stream", "stream_options", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "logit_bias", "ignore_eos", "min_tokens",
})


def parse_chat_request(body: JSON, served_id: str) -> ChatRequest:
    _refuse_unknown(body, CHAT_FIELDS)
    _check_model(body, served_id)
    messages = _parse_messages(body.get("messages"))
    _refuse_formats(body)
    tools = _parse_tools(body)
    sampling = _read_common_sampling(body)
    max_tokens, max_completion = _read_int(body, "max_tokens"), _read_int(body, "max_completion_tokens")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise APIError(400, f"max_tokens ({max_tokens}) and max_completion_tokens ({max_completion}) disagree; "
                       "give one", param="max_completion_tokens", code="invalid_value")
    # Not given: OpenAI's meaning, "until the context is full", not SamplingParams' library default.
    sampling["max_tokens"] = max_completion if max_completion is not None else max_tokens
    logprobs, top = _read_bool(body, "logprobs"), _read_int(body, "top_logprobs")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs", code="invalid_value")
    if logprobs:
        sampling["logprobs"] = True
        sampling["top_logprobs"] = top or 0
    stream, include_usage = _read_stream(body)
    return ChatRequest(messages, _validated(sampling), stream, include_usage, tools)


def _parse_messages(value: object) -> list[JSON]:
    if value is None:
        raise APIError(422, "messages: this field is required", param="messages", code="missing_field")
    if not isinstance(value, list):
        raise _type_error("messages", value, "a list of message objects")
    if not value:
        raise APIError(400, "messages: at least one message is required", param="messages", code="invalid_value")
    return [_parse_message(i, m) for i, m in enumerate(value)]


def _parse_message(i: int, msg: object) -> JSON:
    """Keep the message as the client sent it (roles untouched); flatten content-part arrays to text."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise _type_error(where, msg, "a message object")
    unknown = sorted(set(msg) - MESSAGE_KEYS)
    if unknown:
        raise APIError(400, f"{where}.{unknown[0]} is not supported; supported keys: {', '.join(sorted(MESSAGE_KEYS))}",
                       param=f"{where}.{unknown[0]}", code="unknown_field")
    if not isinstance(msg.get("role"), str):
        raise _type_error(f"{where}.role", msg.get("role"), "a string")
    out = dict(msg)
    content = msg.get("content")
    if isinstance(content, list):
        out["content"] = _flatten_parts(where, content)
    elif content is not None and not isinstance(content, str):
        raise _type_error(f"{where}.content", content, "a string, a list of content parts, or null")
    return out


def _flatten_parts(where: str, parts: list[object]) -> str:
    texts = []
    for j, part in enumerate(parts):
        name = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _type_error(name, part, 'a content part object with a "type"')
        if part["type"] != "text":
            raise APIError(400, f"{name}: content parts of type {part['type']!r} are not supported; only 'text'",
                           param=name, code="unsupported_value")
        if not isinstance(part.get("text"), str):
            raise _type_error(f"{name}.text", part.get("text"), "a string")
        texts.append(part["text"])
    return "\n".join(texts)  # the same joining the chat templates of OpenAI-compatible servers expect


def _refuse_formats(body: JSON) -> None:
    fmt = _read(body, "response_format", lambda v: isinstance(v, dict) and isinstance(v.get("type"), str),
                'an object with a "type"')
    if fmt is not None and fmt["type"] != "text":
        raise APIError(400, f"response_format type {fmt['type']!r} is not supported yet (it needs constrained "
                       "decoding); only 'text'", param="response_format", code="unsupported_value")


def _parse_tools(body: JSON) -> list[JSON] | None:
    """The tools to show the model, or None. ``tool_choice``: "auto" (the default with tools) and "none" (the
    model is not shown the tools) are honored; "required" or a named function would need constrained decoding."""
    tools = _read(body, "tools", lambda v: isinstance(v, list), "a list of tool objects")
    choice = body.get("tool_choice")
    if _read_bool(body, "parallel_tool_calls") is False:
        raise APIError(400, "parallel_tool_calls: false is not supported; the model may call several tools at once",
                       param="parallel_tool_calls", code="unsupported_value")
    if not tools:
        if choice is not None and choice != "none":
            raise APIError(400, f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice",
                           code="invalid_value")
        return None
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise _type_error(where, tool, 'a tool object {"type": "function", "function": {...}}')
        if tool.get("type") != "function":
            raise APIError(400, f"{where}.type: only 'function' tools are supported", param=f"{where}.type",
                           code="unsupported_value")
        function = tool["function"]
        _read(function, "name", lambda v: isinstance(v, str) and bool(v), "a non-empty string")
        if "name" not in function:
            raise APIError(422, f"{where}.function.name: this field is required", param=f"{where}.function.name",
                           code="missing_field")
        _read(function, "parameters", lambda v: isinstance(v, dict), "a JSON schema object")
    if choice is None or choice == "auto":
        return tools
    if choice == "none":
        return None
    raise APIError(400, f"tool_choice {json.dumps(choice)} is not supported (it needs constrained decoding); "
                   "use 'auto' or 'none'", param="tool_choice", code="unsupported_value")


# ---- completions ------------------------------------------------------------------------------------------

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

COMPLETION_FIELDS = frozenset({
    "prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "seed", "n", "logprobs", "stream",
    "stream_options", "echo", "suffix", "best_of", "logit_bias", "ignore_eos", "min_tokens",
})


def parse_completion_request(body: JSON, served_id: str) -> CompletionRequest:
    _refuse_unknown(body, COMPLETION_FIELDS)
    _check_model(body, served_id)
    prompts = _parse_prompts(body.get("prompt"))
    if _read_bool(body, "echo"):
        raise APIError(400, "echo: true is not supported yet", param="echo", code="unsupported_value")
    if _read(body, "suffix", lambda v: isinstance(v, str), "a string"):
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_field")
    sampling = _read_common_sampling(body)
    best_of = _read_int(body, "best_of")
    if best_of is not None and best_of != sampling.get("n", 1):
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_value")
    max_tokens = _read_int(body, "max_tokens")
    sampling["max_tokens"] = COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if (top := _read_int(body, "logprobs")) is not None:  # completions: an int, the number of alternatives
        sampling["logprobs"] = True
        sampling["top_logprobs"] = top
    stream, include_usage = _read_stream(body)
    return CompletionRequest(prompts, _validated(sampling), stream, include_usage)


def _parse_prompts(value: object) -> list[str | list[int]]:
    expected = "a string, a list of token ids, or a list of either"
    if value is None:
        raise APIError(422, "prompt: this field is required", param="prompt", code="missing_field")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _type_error("prompt", value, expected)
    if not value:
        raise APIError(400, "prompt: an empty list is not a prompt", param="prompt", code="invalid_value")
    if all(_is_int(t) for t in value):
        return [list(value)]
    prompts: list[str | list[int]] = []
    for item in value:
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            prompts.append(list(item))
        else:
            raise _type_error("prompt", value, expected)
    return prompts


# ---- responses --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ChoiceState:
    """What one choice has produced so far (for a non-streaming body, or the end of a stream)."""

    text: list[str] = dataclasses.field(default_factory=list)
    reasoning: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[ksdk.TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: ksdk.StreamEvent) -> None:
        if event.text:
            self.text.append(event.text)
        if event.reasoning:
            self.reasoning.append(event.reasoning)
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


@dataclasses.dataclass
class UsageTally:
    """Exact token counts over every prompt and choice of one request.

    The engine puts a choice's usage on its last event: the prompt's tokens (shared by the prompt's n
    choices, so counted once per prompt) and that choice's own completion tokens.
    """

    prompt_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # per prompt
    cached_tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    completion_tokens: int = 0

    def add(self, prompt_index: int, usage: ksdk.Usage) -> None:
        self.prompt_tokens[prompt_index] = usage.prompt_tokens
        self.cached_tokens[prompt_index] = usage.cached_tokens
        self.completion_tokens += usage.completion_tokens


def usage_body(tally: UsageTally) -> JSON:
    prompt = sum(tally.prompt_tokens.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": tally.completion_tokens,
        "total_tokens": prompt + tally.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(tally.cached_tokens.values())},
    }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(items: Sequence[ksdk.TokenLogprob]) -> JSON:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _token_bytes(lp.token),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": _token_bytes(t)} for _, t, v in lp.top],
            }
            for lp in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: Sequence[ksdk.TokenLogprob], start_offset: int, with_top: bool) -> JSON:
    offsets, at = [], start_offset
    for lp in items:
        offsets.append(at)
        at += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for _, t, v in lp.top} for lp in items] if with_top else None,
        "text_offset": offsets,
    }
