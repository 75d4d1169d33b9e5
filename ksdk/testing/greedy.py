"""Run a model alone, greedily, over its own small page pool: the yardstick the engine's batched path
and the other expert/attention paths are compared with."""

from __future__ import annotations

import torch

from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.models import DeepseekForCausalLM

__all__ = ["forced_logits", "greedy_generate", "prefill_logits"]

PAGE_SIZE = 16


def _pool(model: DeepseekForCausalLM, tokens: int) -> tuple[list[torch.Tensor], list[int]]:
    num_pages = -(-tokens // PAGE_SIZE)
    kv = [torch.zeros(num_pages, PAGE_SIZE, model.kv_cache_dim, dtype=model.kv_dtype, device=model.device)
          for _ in model.layers]
    return kv, list(range(num_pages))


def prefill_logits(model: DeepseekForCausalLM, ids: list[int]) -> torch.Tensor:
    """[vocab] fp32 logits after the whole prompt."""
    kv, pages = _pool(model, len(ids))
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [pages], PAGE_SIZE, model.device)
    dev = model.device
    return model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev), meta, kv)[0]


def greedy_generate(model: DeepseekForCausalLM, ids: list[int], max_new_tokens: int) -> list[int]:
    """Prefill ``ids`` in one chunk, then decode token by token; returns the new tokens."""
    kv, pages = _pool(model, len(ids) + max_new_tokens)
    dev = model.device
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [pages], PAGE_SIZE, dev)
    logits = model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev), meta, kv)
    out = [int(logits[0].argmax())]
    while len(out) < max_new_tokens:
        pos = len(ids) + len(out) - 1
        meta = AttentionMetadata.build([1], [pos + 1], [pages], PAGE_SIZE, dev)
        logits = model(torch.tensor([out[-1]], device=dev), torch.tensor([pos], device=dev), meta, kv)
        out.append(int(logits[0].argmax()))
    return out


def forced_logits(model: DeepseekForCausalLM, ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Prefill ``ids``, then decode ``continuation`` token by token whatever the model would pick (teacher
    forcing): [1 + len(continuation), vocab] fp32 logits, after the prompt and after each fed token. Two
    models compared this way see the same inputs even where a near tie sends their greedy tokens apart."""
    kv, pages = _pool(model, len(ids) + len(continuation))
    dev = model.device
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [pages], PAGE_SIZE, dev)
    rows = [model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev), meta, kv)[0]]
    for i, token in enumerate(continuation):
        pos = len(ids) + i
        meta = AttentionMetadata.build([1], [pos + 1], [pages], PAGE_SIZE, dev)
        rows.append(model(torch.tensor([token], device=dev), torch.tensor([pos], device=dev), meta, kv)[0])
    return torch.stack(rows)
