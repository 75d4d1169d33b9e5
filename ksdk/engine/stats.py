"""Engine statistics for metrics: a frozen snapshot and the recorder the step loop feeds."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque

__all__ = ["EngineStats", "StatsRecorder"]

_RATE_WINDOW_S = 10.0  # token rates average over the last seconds of steps


@dataclasses.dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the running batch
    waiting: int  # requests not admitted yet
    pages_total: int
    pages_used: int  # referenced by some sequence
    pages_free: int  # never used or cached-but-unreferenced (evictable)
    prefix_cache_hit_rate: float  # cached / looked-up prompt pages, since start
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    mean_step_ms: float
    mean_forward_ms: float  # the model forward's share of a step
    requests_finished: int
    requests_aborted: int
    requests_failed: int
    prompt_tokens_total: int  # prompt tokens of admitted requests
    cached_prompt_tokens_total: int  # of those, served from the prefix cache
    computed_tokens_total: int  # tokens run through the model (prefill chunks, recomputes and decodes)
    generation_tokens_total: int
    preemptions_total: int
    steps_total: int


class StatsRecorder:
    """Counters written by the step thread; ``snapshot`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._window: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)
        self.counters = dict(requests_finished=0, requests_aborted=0, requests_failed=0, prompt_tokens_total=0,
                             cached_prompt_tokens_total=0, computed_tokens_total=0, generation_tokens_total=0,
                             preemptions_total=0, steps_total=0)
        self.step_s_total = 0.0
        self.forward_s_total = 0.0

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self.counters[key] += value

    def record_step(self, *, step_s: float, forward_s: float, computed: int, prompt: int, generated: int,
                    preempted: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.step_s_total += step_s
            self.forward_s_total += forward_s
            c = self.counters
            c["steps_total"] += 1
            c["computed_tokens_total"] += computed
            c["generation_tokens_total"] += generated
            c["preemptions_total"] += preempted
            self._window.append((now, prompt, generated))
            while self._window and self._window[0][0] < now - _RATE_WINDOW_S:
                self._window.popleft()

    def snapshot(self, *, running: int, waiting: int, pages_total: int, pages_free: int,
                 hit_rate: float) -> EngineStats:
        now = time.monotonic()
        with self._lock:
            window = [w for w in self._window if w[0] >= now - _RATE_WINDOW_S]
            span = max(now - window[0][0], 1e-3) if window else 1.0
            steps = max(self.counters["steps_total"], 1)
            return EngineStats(
                running=running, waiting=waiting, pages_total=pages_total, pages_used=pages_total - pages_free,
                pages_free=pages_free, prefix_cache_hit_rate=hit_rate,
                prompt_tokens_per_s=sum(w[1] for w in window) / span,
                generation_tokens_per_s=sum(w[2] for w in window) / span,
                mean_step_ms=1000 * self.step_s_total / steps, mean_forward_ms=1000 * self.forward_s_total / steps,
                **self.counters)
