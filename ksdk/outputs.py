"""What the engine hands back: stream events and finished results."""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["ChatResult", "CompletionResult", "StreamEvent", "TokenLogprob", "Usage"]

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and, when asked, the top alternatives."""

    token_id: int
    token: str  # the token's text (bytes that are not valid UTF-8 decode with replacement characters)
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, text, logprob), best first


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One step's news for one choice of a request.

    ``text`` is the new answer text, ``reasoning`` the new ``<think>`` text (chat only; for raw
    ``generate`` everything is ``text``). ``finish_reason`` and ``usage`` are set on the last event of a
    choice only.
    """

    request_id: str
    index: int  # choice index, 0 ≤ index < n
    text: str
    token_ids: tuple[int, ...]
    reasoning: str = ""
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None


@dataclasses.dataclass(frozen=True)
class CompletionResult:
    """One finished choice."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    reasoning: str = ""
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_reason: str | int | None = None


@dataclasses.dataclass(frozen=True)
class ChatResult:
    """A finished chat request: ``choices[0]`` mirrors ``text``/``reasoning``/``finish_reason``."""

    request_id: str
    choices: tuple[CompletionResult, ...]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def reasoning(self) -> str:
        return self.choices[0].reasoning

    @property
    def finish_reason(self) -> FinishReason:
        return self.choices[0].finish_reason
