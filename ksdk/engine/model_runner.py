"""Turns a scheduled batch into the model's input tensors, runs the forward and picks sampling rows."""

from __future__ import annotations

import time
from typing import Protocol

import torch

from ksdk.engine.kv_cache import KVCache
from ksdk.engine.scheduler import ScheduledBatch
from ksdk.layers.attention_metadata import AttentionMetadata

__all__ = ["CausalLM", "ModelRunner"]


class CausalLM(Protocol):
    """The model contract the engine relies on (``ksdk.models.DeepseekForCausalLM`` honors it)."""

    device: torch.device
    kv_dtype: torch.dtype
    kv_cache_dim: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: list[torch.Tensor]) -> torch.Tensor: ...


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.last_forward_s = 0.0  # wall time of the last forward, for the host-overhead statistic

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Return ``[S, vocab]`` float32 logits, one row per sequence in ``batch.sampling_seqs``."""
        ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            seq_lens.append(start + n)
            if start + n == len(seq.token_ids):
                sample_rows.append(row)
        device = self.model.device
        meta = AttentionMetadata.build(list(batch.num_new_tokens), seq_lens, [s.pages for s in batch.seqs],
                                       self.kv_cache.plan.page_size, device)
        ids_t = _to_device(torch.tensor(ids, dtype=torch.int64), device)  # [T]
        pos_t = _to_device(torch.tensor(positions, dtype=torch.int64), device)  # [T]
        start_s = time.perf_counter()
        logits = self.model.forward(ids_t, pos_t, meta, self.kv_cache.layers)  # [B, vocab]
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.last_forward_s = time.perf_counter() - start_s
        if len(sample_rows) == len(batch.seqs):
            return logits
        return logits[torch.tensor(sample_rows, dtype=torch.int64, device=logits.device)]


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without stalling the host: pinned memory makes ``non_blocking`` real on CUDA."""
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
