"""DeepSeek's tool-call text parsed into OpenAI ``tool_calls``, whole or while it streams.

DeepSeek-V3/R1 write calls after the answer text, between special tokens::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

V3.1 drops the type and the fence: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"arg": 1}<｜tool▁call▁end｜>``.
Both are read. Text before the calls stays the message content.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

__all__ = ["CALLS_BEGIN", "ToolCallStream", "parse_tool_calls", "split_tool_calls"]

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_END), re.DOTALL)
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)


def _one_call(body: str) -> dict[str, Any] | None:
    head, sep, rest = body.partition(SEP)
    if not sep:
        return None
    if head.strip() == "function":  # V3/R1: type, then NAME on the first line and a fenced JSON block
        name, _, arguments = rest.partition("\n")
        fenced = _FENCE.match(arguments)
        arguments = fenced.group(1) if fenced else arguments
    else:  # V3.1: NAME, then the JSON arguments
        name, arguments = head, rest
    name = name.strip()
    if not name:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments.strip()}}


def parse_tool_calls(section: str) -> list[dict[str, Any]] | None:
    """The calls of a complete tool section (from CALLS_BEGIN on); None if it is not one."""
    if not section.startswith(CALLS_BEGIN) or CALLS_END not in section:
        return None
    calls = [_one_call(m.group(1)) for m in _CALL.finditer(section)]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``(content, calls)`` of a finished answer; a section that does not parse stays in the content."""
    at = text.find(CALLS_BEGIN)
    if at < 0:
        return text, []
    calls = parse_tool_calls(text[at:])
    return (text, []) if calls is None else (text[:at], calls)


@dataclasses.dataclass
class ToolCallStream:
    """Feeds one choice's answer deltas; lets plain text through at once and holds back the tool section."""

    _held: str = ""  # text that is, or may become, the tool section
    _in_section: bool = False

    def feed(self, delta: str) -> str:
        """The part of ``delta`` that is plain text for sure, to stream now."""
        if self._in_section:
            self._held += delta
            return ""
        text = self._held + delta
        at = text.find(CALLS_BEGIN)
        if at >= 0:
            self._in_section, self._held = True, text[at:]
            return text[:at]
        keep = _partial_marker_len(text)  # a marker may arrive split over two deltas
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: ``(text still to stream, calls)``; a section that does not parse is returned as text."""
        held, self._held = self._held, ""
        if not self._in_section:
            return held, []
        calls = parse_tool_calls(held)
        return (held, []) if calls is None else ("", calls)


def _partial_marker_len(text: str) -> int:
    for n in range(min(len(CALLS_BEGIN) - 1, len(text)), 0, -1):
        if CALLS_BEGIN.startswith(text[-n:]):
            return n
    return 0
