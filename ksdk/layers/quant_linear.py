"""Linear layers whose weights stay in their GGUF quant blocks on the GPU (ksdk.kernels.dequant_matmul).

A 4-bit DeepSeek-R1 keeps about 10 GB of non-expert weights this way instead of 36 GB in bf16, and decode
reads each weight's bytes once per step. Types without a kernel (float types, rarer quants) fall back to a
dense :class:`~ksdk.layers.linear.Linear` in the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from ksdk.kernels.dequant_matmul import KERNEL_QTYPES, dequant_matmul
from ksdk.layers.linear import Linear, load_dense
from ksdk.weights.quants import bytes_per_row

if TYPE_CHECKING:
    from ksdk.weights.gguf_file import TensorView

__all__ = ["QuantLinear", "quant_linear"]


class QuantLinear(torch.nn.Module):
    """y = x @ W.T with W [out_features, in_features] held as GGUF bytes ``raw`` uint8 [out_features, bytes_per_row]."""

    def __init__(self, raw: torch.Tensor, qtype: GGMLQuantizationType, in_features: int) -> None:
        super().__init__()
        qtype = GGMLQuantizationType(qtype)
        if qtype not in KERNEL_QTYPES:
            raise ValueError(f"{qtype.name} has no kernel; allowed: {', '.join(q.name for q in KERNEL_QTYPES)}")
        expected = bytes_per_row(qtype, in_features)
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != expected:
            raise ValueError(f"raw is {raw.dtype} {tuple(raw.shape)}; expected uint8 [out_features, {expected}]")
        self.register_buffer("raw", raw.contiguous(), persistent=False)
        self.qtype, self.in_features = qtype, in_features

    @classmethod
    def from_view(cls, view: TensorView, device: torch.device) -> QuantLinear:
        """Copy a 2-D tensor's bytes to ``device`` (the file mapping is read-only: one host copy on the way)."""
        return cls(torch.from_numpy(np.array(view.raw)).to(device), view.qtype, view.shape[1])

    @property
    def out_features(self) -> int:
        return self.raw.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        flat = x.reshape(-1, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        return dequant_matmul(flat, self.raw, self.qtype, self.in_features).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.qtype.name}, in_features={self.in_features}, out_features={self.out_features}"


def quant_linear(view: TensorView, device: torch.device, dtype: torch.dtype) -> QuantLinear | Linear:
    """A :class:`QuantLinear` when ``view``'s type has a kernel, else a dense ``Linear`` in ``dtype``."""
    if view.qtype in KERNEL_QTYPES:
        return QuantLinear.from_view(view, device)
    return Linear(load_dense(view, device, dtype))
