"""Separating a reasoning model's ``<think>...</think>`` text from its answer, also while streaming."""

from __future__ import annotations

__all__ = ["ReasoningParser", "split_reasoning"]


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Routes streamed text to reasoning or content.

    One reasoning block at most: it is open from the start when the prompt opened it (``start_in_reasoning``),
    or opens on ``open_tag`` if that comes before any non-blank content. It ends at ``close_tag``; everything
    after is content, tags included. Text that could be the start of a tag is held back until it is decided.
    """

    def __init__(self, start_in_reasoning: bool, open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        if not open_tag or not close_tag:
            raise ValueError("open_tag and close_tag must be non-empty")
        self._open_tag = open_tag
        self._close_tag = close_tag
        self._in_reasoning = start_in_reasoning
        self._done = False  # a reasoning block has closed, or content has begun: no tags any more
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """Add streamed text; return the (reasoning_delta, content_delta) it settles."""
        text = self._pending + delta
        self._pending = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._done:
                content.append(text)
                break
            tag = self._close_tag if self._in_reasoning else self._open_tag
            index = text.find(tag)
            keep = 0 if index >= 0 else _partial_tag_length(text, tag)
            if not self._in_reasoning:
                before = text[:index] if index >= 0 else text[: len(text) - keep]
                if before.strip():
                    # Real content came first: no reasoning block in this output.
                    self._done = True
                    continue
            if index >= 0:
                (reasoning if self._in_reasoning else content).append(text[:index])
                text = text[index + len(tag) :]
                self._done = self._in_reasoning
                self._in_reasoning = not self._in_reasoning
                continue
            (reasoning if self._in_reasoning else content).append(text[: len(text) - keep])
            self._pending = text[len(text) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of the stream: release held-back text where it was going."""
        pending, self._pending = self._pending, ""
        return (pending, "") if self._in_reasoning else ("", pending)


def split_reasoning(text: str, start_in_reasoning: bool) -> tuple[str, str]:
    """Split a whole completion into (reasoning, content)."""
    parser = ReasoningParser(start_in_reasoning)
    reasoning, content = parser.feed(text)
    tail_reasoning, tail_content = parser.finish()
    return reasoning + tail_reasoning, content + tail_content
