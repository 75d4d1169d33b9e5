"""Continuous batching: FCFS admission by free pages, chunked prefill under a token budget, and
preemption by recompute (newest first) when pages run out."""

from __future__ import annotations

import dataclasses
from collections import deque

from ksdk.engine.page_table import PageTable
from ksdk.engine.request import Sequence, SequenceStatus

__all__ = ["ScheduledBatch", "Scheduler"]


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    """The sequences one step runs and how many new tokens each brings."""

    seqs: tuple[Sequence, ...] = ()
    num_new_tokens: tuple[int, ...] = ()
    sampling_seqs: tuple[Sequence, ...] = ()  # chunks that reach their sequence's last token: they sample
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, page_table: PageTable, max_num_seqs: int, max_batch_tokens: int) -> None:
        self.page_table = page_table
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest arrival first

    @property
    def has_work(self) -> bool:
        return bool(self.running) or any(not s.blocked for s in self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` wherever it is and free its pages."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.page_table.release(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        budget = self.max_batch_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted = 0
        for seq in list(self.running):  # running first, oldest first: decodes and unfinished prefills
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one this step
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            assert n > 0, "a running sequence always has a token to compute"
            while not self.page_table.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                seqs.append(seq)
                counts.append(n)
                budget -= n
        if not preempted:  # admitting while preempting would only thrash
            budget = self._admit_waiting(budget, seqs, counts)
        sampling = tuple(s for s, n in zip(seqs, counts) if s.num_computed_tokens + n == len(s.token_ids))
        return ScheduledBatch(tuple(seqs), tuple(counts), sampling, preempted)

    def _admit_waiting(self, budget: int, seqs: list[Sequence], counts: list[int]) -> int:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.blocked:
                continue
            cached = self.page_table.match_prefix(seq.token_ids)
            if not self.page_table.can_admit(seq, cached):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.remove(seq)
            self.page_table.admit(seq, cached)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.running.sort(key=lambda s: s.arrival)
        return budget

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and queue it first for recompute (its tokens so far become its prompt)."""
        self.running.remove(seq)
        self.page_table.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
