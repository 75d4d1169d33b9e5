"""A fake engine with the part of ksdk.Engine's API the gateway uses: deterministic words, no model, every error on demand.

Each token is one word plus a space. Chat choices first "think" (``REASONING`` as reasoning tokens), then
answer with words from ``WORDS``: in order when greedy or unseeded, else drawn from a generator seeded by
``seed`` and the choice index. Offered tools, a chat answer calls the first one in DeepSeek's format. An answer ends with "stop" after ``answer_tokens`` words, or "length" at max_tokens. Stop
strings cut the text before them. ``token_delay`` slows each step so tests can disconnect mid-stream.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import uuid
from collections.abc import AsyncIterator

import anyio

import ksdk

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")
REASONING = ("Let", "me", "think.")
ROLES = frozenset({"system", "user", "assistant", "tool"})
PAGE_TOKENS = 16


class FakeState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class FakeStats:
    running: int
    waiting: int
    pages_total: int
    pages_used: int
    pages_free: int
    prefix_cache_hit_rate: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    mean_step_ms: float
    requests_finished: int
    requests_aborted: int
    generation_tokens_total: int


class FakeEngine:
    def __init__(self, *, model_id: str = "fake-r1", max_model_len: int = 256, answer_tokens: int = 12,
                 token_delay: float = 0.0, pages_total: int = 64) -> None:
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.answer_tokens = answer_tokens
        self.token_delay = token_delay
        self.pages_total = pages_total
        self.state = FakeState.CREATED
        self.busy = False  # when True every new request raises EngineBusyError
        self.start_calls = 0
        self.calls: list[tuple[str, object, dict[str, object]]] = []  # (kind, messages or prompt, sampling)
        self.pages: dict[str, int] = {}  # request id -> pages held while running
        self.aborted: list[str] = []
        self.tools_seen: list[list | None] = []
        self.finished = 0
        self.generated = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.start_calls += 1
        await anyio.sleep(0)
        self.state = FakeState.RUNNING

    async def aclose(self) -> None:
        self.state = FakeState.CLOSED

    async def __aenter__(self) -> FakeEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- requests ----------------------------------------------------------------------------------
    def stream(self, messages: list[dict], *, request_id: str | None = None, tools: list | None = None,
               **sampling: object) -> AsyncIterator[ksdk.StreamEvent]:
        for m in messages:
            if m.get("role") not in ROLES:
                raise ksdk.InvalidRequestError(f"role {m.get('role')!r} is not one of {sorted(ROLES)}")
        prompt_tokens = sum(2 + len(str(m.get("content") or "").split()) for m in messages)
        self.calls.append(("chat", [dict(m) for m in messages], sampling))  # a copy: callers reuse lists
        self.tools_seen.append(tools)
        answer = tool_call_pieces(tools[0]["function"]["name"]) if tools else None
        return self._run(request_id, prompt_tokens, sampling, reasoning=True, answer=answer)

    def generate(self, prompt: str | list[int], *, request_id: str | None = None,
                 **sampling: object) -> AsyncIterator[ksdk.StreamEvent]:
        prompt_tokens = len(prompt) if isinstance(prompt, list) else max(1, len(prompt.split()))
        self.calls.append(("generate", prompt, sampling))
        return self._run(request_id, prompt_tokens, sampling, reasoning=False)

    def abort(self, request_id: str) -> None:
        if request_id in self.pages:
            self.aborted.append(request_id)
            del self.pages[request_id]

    def stats(self) -> FakeStats:
        used = sum(self.pages.values())
        return FakeStats(running=len(self.pages), waiting=0, pages_total=self.pages_total, pages_used=used,
                         pages_free=self.pages_total - used, prefix_cache_hit_rate=0.0, prompt_tokens_per_s=1.5,
                         generation_tokens_per_s=2.5, mean_step_ms=1.0, requests_finished=self.finished,
                         requests_aborted=len(self.aborted), generation_tokens_total=self.generated)

    # -- internals ---------------------------------------------------------------------------------
    async def _run(self, request_id: str | None, prompt_tokens: int, sampling: dict[str, object],
                   reasoning: bool, answer: list[str] | None = None) -> AsyncIterator[ksdk.StreamEvent]:
        if self.state is not FakeState.RUNNING:
            raise ksdk.EngineClosedError(f"the engine is {self.state.value}")
        params = ksdk.SamplingParams.from_kwargs(**sampling)
        if params.max_tokens is not None and prompt_tokens + params.max_tokens > self.max_model_len:
            raise ksdk.ContextLengthError(f"prompt ({prompt_tokens}) + max_tokens ({params.max_tokens}) exceeds "
                                          f"max_model_len ({self.max_model_len})")
        if self.busy:
            raise ksdk.EngineBusyError("the waiting queue is full")
        rid = request_id or uuid.uuid4().hex
        self.pages[rid] = params.n * 2
        limit = params.max_tokens or self.max_model_len - prompt_tokens
        choices = [self._choice(params, i, reasoning, limit, answer) for i in range(params.n)]
        try:
            step = 0
            while any(step < len(c) for c in choices):
                await anyio.sleep(self.token_delay)
                if rid not in self.pages:  # aborted
                    for i in range(params.n):
                        yield ksdk.StreamEvent(rid, i, "", (), finish_reason="abort")
                    return
                for i, tokens in enumerate(choices):
                    if step < len(tokens):
                        ev = tokens[step]
                        if ev.finish_reason is not None:
                            ev = dataclasses.replace(ev, request_id=rid,
                                                     usage=ksdk.Usage(prompt_tokens, len(tokens), 0))
                        yield dataclasses.replace(ev, request_id=rid)
                        self.generated += 1
                step += 1
            self.finished += 1
        finally:
            self.pages.pop(rid, None)  # closing the stream early frees the pages, as the real engine does

    def _choice(self, params: ksdk.SamplingParams, index: int, reasoning: bool, limit: int,
                answer: list[str] | None) -> list[ksdk.StreamEvent]:
        """One choice's events, one per token, the last one carrying finish_reason."""
        if answer is None:
            if params.greedy or params.seed is None:
                words = [WORDS[k % len(WORDS)] for k in range(self.answer_tokens)]
            else:
                rng = random.Random(params.seed * 100 + index)
                words = [rng.choice(WORDS) for _ in range(self.answer_tokens)]
            answer = [w + " " for w in words]
        pieces = [(w + " ", True) for w in (REASONING if reasoning else ())] + [(p, False) for p in answer]
        events, answer, finish, stop_reason = [], "", "stop", None
        for k, (piece, is_reasoning) in enumerate(pieces[:limit]):
            text = ""
            if not is_reasoning:
                hit = _first_stop(answer + piece, params.stop)
                if hit is not None:
                    cut, stop_reason = hit
                    text = (answer + piece)[len(answer):cut]
                    events.append(self._event(index, k, text, "", params, finish="stop", stop_reason=stop_reason))
                    return events
                answer += piece
                text = piece
            events.append(self._event(index, k, text, piece if is_reasoning else "", params))
        if len(pieces) > limit:
            finish = "length"
        last = events[-1]
        events[-1] = dataclasses.replace(last, finish_reason=finish)
        return events

    @staticmethod
    def _event(index: int, k: int, text: str, reasoning: str, params: ksdk.SamplingParams,
               finish: str | None = None, stop_reason: str | None = None) -> ksdk.StreamEvent:
        token = text or reasoning
        logprobs = None
        if params.logprobs:
            top = tuple((1000 + j, WORDS[j], -0.5 - j) for j in range(params.top_logprobs))
            logprobs = (ksdk.TokenLogprob(100 + k, token, -0.25, top),)
        return ksdk.StreamEvent("", index, text, (100 + k,), reasoning=reasoning, logprobs=logprobs,
                                finish_reason=finish, stop_reason=stop_reason)  # type: ignore[arg-type]


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits) if hits else None


def tool_call_pieces(name: str) -> list[str]:
    """An answer that calls ``name`` in DeepSeek-V3/R1's format, one token per piece (markers are tokens)."""
    return ["Let me check. ", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "function", "<｜tool▁sep｜>",
            name, "\n```json\n", '{"city": ', '"Paris"}', "\n```", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"]
