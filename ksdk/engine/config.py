"""How the engine is sized and scheduled: one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses

from ksdk.errors import InvalidRequestError

__all__ = ["EngineConfig"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine options. ``None`` sizes: ``max_model_len`` defaults to the model's context (shrunk to what
    memory holds) and ``kv_cache_tokens`` to ``max_num_seqs`` full-length requests (capped by memory)."""

    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    page_size: int = 16
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048  # token budget of one step: decodes plus prefill chunks
    max_waiting: int = 256
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidRequestError(f"{name}: got {getattr(self, name)!r}, allowed: {allowed}")

        def positive(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        check("max_model_len", self.max_model_len is None or positive(self.max_model_len), "an integer >= 1 or None")
        check("kv_cache_tokens", self.kv_cache_tokens is None or positive(self.kv_cache_tokens),
              "an integer >= 1 or None")
        check("page_size", positive(self.page_size) and self.page_size <= 1024, "an integer from 1 to 1024")
        check("max_num_seqs", positive(self.max_num_seqs), "an integer >= 1")
        check("max_batch_tokens", positive(self.max_batch_tokens), "an integer >= 1")
        check("max_waiting", positive(self.max_waiting), "an integer >= 1")
        check("enable_prefix_caching", isinstance(self.enable_prefix_caching, bool), "true or false")
