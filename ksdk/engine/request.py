"""Request and sequence state: one request, ``n`` sequences (one per choice), shared prompt."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from collections.abc import Callable
from typing import Protocol

import torch

from ksdk.engine.stop_matcher import StopMatcher
from ksdk.outputs import TokenLogprob
from ksdk.sampling import SamplingParams

__all__ = ["Detokenizer", "Request", "Sequence", "SequenceStatus"]

_arrival = itertools.count()


class Detokenizer(Protocol):
    """Turns token ids into text incrementally, never splitting a UTF-8 character."""

    def push(self, ids: list[int]) -> str: ...

    def flush(self) -> str: ...


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """What a caller asked for; owns its sequences. ``max_tokens`` is resolved (never None)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    eos_token_ids: tuple[int, ...]
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)

    @classmethod
    def create(cls, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams, max_tokens: int,
               eos_token_ids: tuple[int, ...], make_detokenizer: Callable[[], Detokenizer],
               device: torch.device, share_prompt: bool) -> Request:
        """Build the request and its ``params.n`` sequences; with ``share_prompt`` choices 1.. wait for
        choice 0's prefill so that they reuse its prompt pages from the prefix cache."""
        req = cls(request_id, prompt_ids, params, max_tokens, eos_token_ids)
        for index in range(params.n):
            gen = torch.Generator(device=device)
            if params.seed is None:
                gen.seed()
            else:  # each choice its own stream, reproducible from (seed, index)
                gen.manual_seed(hash((params.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            leader = req.sequences[0] if share_prompt and index > 0 else None
            req.sequences.append(Sequence(req, index, list(prompt_ids), gen, make_detokenizer(),
                                          StopMatcher(params.stop), leader=leader))
        return req

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.sequences)


@dataclasses.dataclass(eq=False)
class Sequence:
    """One choice of a request: its tokens, its pages and how far the cache holds them."""

    request: Request
    index: int
    token_ids: list[int]  # prompt, then output
    generator: torch.Generator
    detokenizer: Detokenizer
    stop_matcher: StopMatcher
    leader: Sequence | None = None  # prefill waits until the leader's prompt pages are cached
    arrival: int = dataclasses.field(default_factory=lambda: next(_arrival))
    status: SequenceStatus = SequenceStatus.WAITING
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose latents are in the cache
    num_hashed_pages: int = 0  # leading full pages registered in (or found in) the prefix cache
    last_page_hash: int | None = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache at first admission
    prompt_done: bool = False  # the prompt was prefilled at least once
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def blocked(self) -> bool:
        """Waits for its leader to cache the shared prompt first."""
        return self.leader is not None and not self.leader.prompt_done and \
            self.leader.status is not SequenceStatus.FINISHED
