"""Bare sequences for unit tests of the page table, scheduler and sampler (no model, no engine)."""

from __future__ import annotations

import torch

from ksdk.engine.request import Request, Sequence
from ksdk.engine.stop_matcher import StopMatcher
from ksdk.sampling import SamplingParams


class _NoText:
    def push(self, ids: list[int]) -> str:
        return ""

    def flush(self) -> str:
        return ""


def make_seq(tokens: list[int], *, max_tokens: int = 8, **params: object) -> Sequence:
    req = Request.create("r", tuple(tokens), SamplingParams(max_tokens=max_tokens, **params), max_tokens, (),  # type: ignore[arg-type]
                         _NoText, torch.device("cpu"), share_prompt=False)
    return req.sequences[0]


def make_seqs(tokens: list[int], n: int, **params: object) -> list[Sequence]:
    req = Request.create("r", tuple(tokens), SamplingParams(n=n, **params), 8, (), _NoText,  # type: ignore[arg-type]
                         torch.device("cpu"), share_prompt=True)
    return req.sequences


__all__ = ["StopMatcher", "make_seq", "make_seqs"]
