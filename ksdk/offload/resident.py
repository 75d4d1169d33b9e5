"""Routed experts kept in GPU memory: the VRAM a model's budget leaves holds some of each layer's experts.

A decode token reads 8 experts per MoE layer from host memory, which sets decode speed (DESIGN.md §6); each
expert that lives on the GPU instead takes its share of that read off the CPU. ``ResidentExperts`` holds
one layer's chosen experts in their GGUF blocks, back to back (``ExpertLayout``), and a table ``slots`` [E]
(int32 on the GPU: the expert's slot, or -1). For a batch it

- hides its experts from the CPU side (:meth:`host_ids`: their ids become -1, which the native experts and
  the streamed GPU experts skip), and
- computes them itself (:meth:`forward`): decode-sized batches with ``ksdk.kernels.expert_gemv`` (no host
  sync, capturable in the decode step's graph), longer ones expert by expert as the streamed experts do,
  without the copies.

:func:`resident_counts` shares a byte budget among the MoE layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ksdk.kernels.expert_gemv import expert_gemv
from ksdk.offload.gpu_experts import CHUNK_PAIRS, ExpertLayout, accumulate_experts, route_plan

if TYPE_CHECKING:
    from ksdk.offload.cpu_experts import ExpertTensorView

__all__ = ["GEMV_MAX_TOKENS", "ResidentExperts", "resident_counts"]

# Batches up to this many tokens (every captured decode step) run the per-pair GEMV kernels; longer ones group
# pairs by expert and multiply each expert's tokens at once (one host sync for the plan).
GEMV_MAX_TOKENS = 32


def resident_counts(budget_bytes: int, expert_bytes: Sequence[int], n_expert: int) -> list[int]:
    """How many experts each MoE layer keeps on the GPU within ``budget_bytes``: the same number in every
    layer (each decode token reads every layer alike), at most ``n_expert``; layers whose experts are larger
    than the rest's share may get fewer. ``expert_bytes``: one expert's bytes, per MoE layer."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes}; give bytes >= 0")
    if not expert_bytes:
        return []
    per_layer = min(n_expert, budget_bytes // sum(expert_bytes))
    counts = [per_layer] * len(expert_bytes)
    left = budget_bytes - per_layer * sum(expert_bytes)
    for i, nbytes in enumerate(expert_bytes):  # what the even share leaves: one more expert where it fits
        if counts[i] < n_expert and nbytes <= left:
            counts[i] += 1
            left -= nbytes
    return counts


class ResidentExperts:
    """Experts ``experts`` of one layer (views gate, up: (E, I, H), down: (E, H, I), of types with a GPU kernel)
    copied to ``device``. Also a ``RoutedExperts``-like helper: :meth:`forward` gives their weighted output."""

    def __init__(self, gate: ExpertTensorView, up: ExpertTensorView, down: ExpertTensorView,
                 experts: Sequence[int], device: torch.device) -> None:
        self.layout = ExpertLayout.from_views(gate, up, down)
        n_expert = int(gate.shape[0])
        chosen = sorted(set(int(e) for e in experts))
        if len(chosen) != len(experts) or (chosen and not 0 <= chosen[0] <= chosen[-1] < n_expert):
            raise ValueError(f"experts={list(experts)}: give distinct ids in [0, {n_expert})")
        self.experts, self.n_expert, self.device = chosen, n_expert, device
        slots = torch.full((n_expert,), -1, dtype=torch.int32)
        slots[chosen] = torch.arange(len(chosen), dtype=torch.int32)
        self.slots = slots.to(device)
        self._slot_of = {e: i for i, e in enumerate(chosen)}
        self.weights = torch.empty(len(chosen), self.layout.nbytes, dtype=torch.uint8, device=device)
        with warnings.catch_warnings():  # the file mapping is read-only, and we only ever read it
            warnings.simplefilter("ignore", UserWarning)
            for slot, e in enumerate(chosen):
                parts = [torch.from_numpy(np.ascontiguousarray(v.raw[e]).reshape(-1)) for v in (gate, up, down)]
                self.weights[slot].copy_(torch.cat(parts))

    @property
    def nbytes(self) -> int:
        return self.weights.numel()

    def host_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` [T, k] with the slots of resident experts set to -1: what the CPU (or streamed) side computes."""
        return torch.where(self._resident(ids), -1, ids)

    def _resident(self, ids: torch.Tensor) -> torch.Tensor:
        return self.slots[ids] >= 0

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ over each token's slots whose expert is resident of weight · expert(x): x [T, hidden] on the
        device, ids [T, k], weights [T, k] -> [T, hidden] fp32 (zeros for tokens without a resident expert)."""
        if x.shape[0] <= GEMV_MAX_TOKENS:
            return self._per_pair(x, ids.long().contiguous(), weights.float().contiguous())
        out = torch.zeros(x.shape[0], self.layout.hidden, dtype=torch.float32, device=x.device)
        plan = route_plan(torch.where(self._resident(ids), ids, -1), weights)
        for first, last in plan.chunks(CHUNK_PAIRS):
            accumulate_experts(out, x, plan, first, last, lambda e: self.weights[self._slot_of[e]], self.layout)
        return out

    def _per_pair(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every (token, slot) pair on its own: gate and up, SiLU · up in x's dtype, down rounded to x's dtype
        and weighted in fp32, the k slots summed in order. Only the resident experts' programs loop."""
        H, I = self.layout.hidden, self.layout.intermediate
        (q_gate, q_up, q_down), (gate_bytes, up_bytes, _) = self.layout.qtypes, self.layout.part_bytes
        T, k = ids.shape
        gate_up = torch.empty(T * k, 2 * I, dtype=x.dtype, device=x.device)
        if q_gate == q_up:  # gate and up rows back to back: one launch
            expert_gemv(x, self.weights, 0, 2 * I, q_gate, self.slots, ids, out=gate_up)
        else:
            expert_gemv(x, self.weights, 0, I, q_gate, self.slots, ids, out=gate_up[:, :I])
            expert_gemv(x, self.weights, gate_bytes, I, q_up, self.slots, ids, out=gate_up[:, I:])
        act = torch.nn.functional.silu(gate_up[:, :I]).mul_(gate_up[:, I:])  # [T·k, I]
        y = expert_gemv(act, self.weights, gate_bytes + up_bytes, H, q_down, self.slots, ids, per_pair=True,
                        scale=weights)  # [T·k, H] fp32, zeros for the pairs of other experts
        return y.view(T, k, H).sum(dim=1)
