"""How the routed experts run: which backend, how many native threads, where their bytes live."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from ksdk.errors import InvalidRequestError

__all__ = ["EXPERT_BACKENDS", "EXPERT_MEMORY", "ExpertOptions", "parse_bytes"]

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
    share of a long batch's experts meanwhile; "mmap" streams through pinned staging buffers, GPU only.
    ``gpu_bytes`` (a model on a GPU): GPU memory for routed experts kept there, shared evenly by the MoE layers
    (``ksdk.offload.resident``); the GPU computes those and the CPU reads only the others. 0: none. Each
    layer keeps its lowest-numbered experts: which experts a batch picks is not known at load."""

    backend: Literal["auto", "native", "torch"] = "auto"
    threads: int | None = None
    memory: Literal["mmap", "ram", "locked"] = "mmap"
    gpu_stream_threshold: int | None = None
    gpu_bytes: int = 0

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
        if not isinstance(self.gpu_bytes, int) or isinstance(self.gpu_bytes, bool) or self.gpu_bytes < 0:
            raise InvalidRequestError(f"gpu_expert_memory={self.gpu_bytes!r}; give bytes >= 0 (0: no experts on "
                                      f"the GPU)")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """A byte count from an int or a string such as "512MiB", "20GiB", "1.5GB" or "4096" (units: B, KB, MB,
    GB, TB in powers of 1000, KiB, MiB, GiB, TiB in powers of 1024). InvalidRequestError if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidRequestError(f"{value} bytes: give a size >= 0")
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS:
        raise InvalidRequestError(f"{value!r} is not a size; give bytes, or a number with a unit such as 512MiB, "
                                  f"20GiB, 1.5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
