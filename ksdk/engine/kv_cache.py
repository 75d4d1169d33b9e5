"""Device pages of the MLA latent cache: per layer ``[num_pages, page_size, kv_lora_rank + rope_dim]``,
sized once at start-up from a token budget and the memory actually available."""

from __future__ import annotations

import dataclasses
import os

import torch

from ksdk.errors import CacheConfigError

__all__ = ["KVCache", "KVCachePlan", "available_memory_bytes"]

GiB = 1024**3
_CPU_SHARE = 0.5  # of available host RAM, leaving room for weights, activations and the OS
_GPU_SHARE = 0.9  # of free device memory after the model was loaded


def available_memory_bytes(device: torch.device) -> int:
    """Bytes the cache may take on ``device`` right now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _GPU_SHARE)
    return int(_host_available_bytes() * _CPU_SHARE)


def _host_available_bytes() -> int:
    """MemAvailable counts reclaimable page cache (a just-read GGUF file fills it); MemFree does not."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: fall back to free pages
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class KVCachePlan:
    num_pages: int
    page_size: int
    max_model_len: int
    bytes_per_token: int

    @property
    def num_bytes(self) -> int:
        return self.num_pages * self.page_size * self.bytes_per_token

    @classmethod
    def build(cls, *, num_layers: int, kv_cache_dim: int, dtype: torch.dtype, context_length: int,
              page_size: int, max_model_len: int | None, kv_cache_tokens: int | None, max_num_seqs: int,
              available_bytes: int) -> KVCachePlan:
        """Check the asked sizes against each other and against memory; never plan what cannot run."""
        per_token = num_layers * kv_cache_dim * torch.empty((), dtype=dtype).element_size()
        fits = available_bytes // per_token  # tokens the memory holds
        if max_model_len is not None and max_model_len > context_length:
            raise CacheConfigError(f"max_model_len={max_model_len} exceeds the model's context length "
                                   f"{context_length}; allowed: 1 to {context_length}")
        if kv_cache_tokens is not None and kv_cache_tokens > fits:
            raise CacheConfigError(
                f"kv_cache_tokens={kv_cache_tokens} needs {kv_cache_tokens * per_token / GiB:.2f} GiB but only "
                f"{available_bytes / GiB:.2f} GiB may be used; allowed: at most {fits} tokens")
        if max_model_len is None:  # default: the model's context, shrunk to what the cache can hold
            max_model_len = min(context_length, (kv_cache_tokens or fits) // page_size * page_size)
            if max_model_len < page_size:
                raise CacheConfigError(f"only {available_bytes / GiB:.3f} GiB may be used for the KV cache, "
                                       f"{fits} tokens; at least one page ({page_size} tokens) is needed")
        tokens = kv_cache_tokens if kv_cache_tokens is not None else min(fits, max_num_seqs * max_model_len)
        num_pages = tokens // page_size
        if num_pages * page_size < max_model_len:
            need = -(-max_model_len // page_size) * page_size
            hint = "raise kv_cache_tokens or lower max_model_len" if kv_cache_tokens is not None else \
                "lower max_model_len or free memory"
            raise CacheConfigError(
                f"the KV cache holds {num_pages} pages of {page_size} tokens ({num_pages * page_size} tokens), "
                f"fewer than one request of max_model_len={max_model_len} needs ({need} tokens); {hint}")
        return cls(num_pages, page_size, max_model_len, per_token)


class KVCache:
    """One tensor per layer on the model's device, filled by the model's forward at the slot mapping."""

    def __init__(self, plan: KVCachePlan, *, num_layers: int, kv_cache_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.plan = plan
        try:
            self.layers = [torch.zeros((plan.num_pages, plan.page_size, kv_cache_dim), dtype=dtype, device=device)
                           for _ in range(num_layers)]  # each [num_pages, page_size, kv_cache_dim]
        except (RuntimeError, MemoryError) as exc:  # out of memory despite the plan: say what was asked
            raise CacheConfigError(f"could not allocate the KV cache ({plan.num_bytes / GiB:.2f} GiB on "
                                   f"{device}): {exc}; lower kv_cache_tokens") from exc
