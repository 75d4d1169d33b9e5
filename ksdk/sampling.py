"""Per-request sampling parameters, validated once, with OpenAI's names."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ksdk.errors import SamplingParamError

__all__ = ["MAX_TOP_LOGPROBS", "SamplingParams"]

MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` is greedy.

    ``max_tokens=None`` means "until the context is full". ``stop`` strings are not part of the
    output; ``stop_token_ids`` are added to the model's own end-of-sequence ids.
    """

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop token ids cannot be drawn before this many tokens
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplingParams:
        """Build from keyword arguments, naming any unknown keyword in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise SamplingParamError(unknown[0], f"unknown sampling parameter; known: {', '.join(sorted(names))}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def _validate(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise SamplingParamError(name, f"got {getattr(self, name)!r}, allowed: {allowed}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN

        check("max_tokens", self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              "an integer >= 1 or None")
        check("temperature", is_num(self.temperature) and 0.0 <= self.temperature <= 2.0, "0.0 to 2.0")
        check("top_p", is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "greater than 0.0, at most 1.0")
        check("top_k", is_int(self.top_k) and self.top_k >= -1, "-1 or 0 (off), or an integer >= 1")
        check("min_p", is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "0.0 to 1.0")
        check("presence_penalty", is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
              "-2.0 to 2.0")
        check("frequency_penalty", is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
              "-2.0 to 2.0")
        check("repetition_penalty", is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
              "greater than 0.0, at most 10.0")
        check("seed", self.seed is None or is_int(self.seed), "an integer or None")
        check("stop", len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
              "up to 16 non-empty strings")
        check("stop_token_ids", all(is_int(t) and t >= 0 for t in self.stop_token_ids), "non-negative integers")
        check("min_tokens", is_int(self.min_tokens) and 0 <= self.min_tokens
              and (self.max_tokens is None or self.min_tokens <= self.max_tokens), "0 to max_tokens")
        check("logprobs", isinstance(self.logprobs, bool), "true or false")
        check("top_logprobs", is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
              f"0 to {MAX_TOP_LOGPROBS}")
        check("n", is_int(self.n) and 1 <= self.n <= 16, "1 to 16")

    def with_stop_tokens(self, ids: Sequence[int]) -> SamplingParams:
        return dataclasses.replace(self, stop_token_ids=tuple(dict.fromkeys((*self.stop_token_ids, *ids))))
