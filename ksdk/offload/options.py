"""How the routed experts run: which backend, how many native threads, where their bytes live."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ksdk.errors import InvalidRequestError

__all__ = ["EXPERT_BACKENDS", "EXPERT_MEMORY", "ExpertOptions"]

EXPERT_BACKENDS = ("auto", "native", "torch")
EXPERT_MEMORY = ("mmap", "ram", "locked")


@dataclasses.dataclass(frozen=True)
class ExpertOptions:
    """``backend``: "native" (ksdk._native on the CPU, straight from the GGUF blocks), "torch" (dequantize the
    touched experts), or "auto" (native when built and every expert type has a kernel). ``threads``: native
    workers (default: physical cores - 1). ``memory``: read the memory-mapped file ("mmap"), copy the experts
    into process memory ("ram"), or copy and ``mlock`` them ("locked"). ``gpu_stream_threshold`` (a model on a
    GPU with native experts): from how many tokens a call streams the experts to the GPU instead (long
    prompts); None measures it at the first long batch, 0 never streams. With "ram"/"locked" the copies are
    registered with CUDA, so streamed experts are copied to the GPU directly, and the CPU computes a measured
    share of a long batch's experts meanwhile; "mmap" streams through pinned staging buffers, GPU only."""

    backend: Literal["auto", "native", "torch"] = "auto"
    threads: int | None = None
    memory: Literal["mmap", "ram", "locked"] = "mmap"
    gpu_stream_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in EXPERT_BACKENDS:
            raise InvalidRequestError(f"experts={self.backend!r}; choose one of {', '.join(EXPERT_BACKENDS)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidRequestError(f"expert_threads={self.threads!r}; give an integer >= 1, or None")
        if self.memory not in EXPERT_MEMORY:
            raise InvalidRequestError(f"expert_memory={self.memory!r}; choose one of {', '.join(EXPERT_MEMORY)}")
        threshold = self.gpu_stream_threshold
        if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0):
            raise InvalidRequestError(f"gpu_stream_threshold={threshold!r}; give an integer >= 0 (0: never), "
                                      f"or None (measure)")
