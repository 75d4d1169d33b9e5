"""Token embedding that dequantizes only the looked-up rows (R1's table is 0.5 GB at 4 bits).

The table stays in host memory (memory-mapped). On a GPU only the rows' quantized bytes cross: they are decoded
there (an 8K-token prompt's rows took ~0.1-0.25 s to decode on the CPU of the lent H100 host)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ksdk.weights.quants import dequantize

if TYPE_CHECKING:
    from ksdk.weights.gguf_file import TensorView

__all__ = ["Embedding"]


class Embedding(torch.nn.Module):
    def __init__(self, view: TensorView, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.view = view
        self.device, self.dtype = device, dtype
        self.num_embeddings, self.dim = view.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, dim]."""
        rows = np.ascontiguousarray(self.view.raw[ids.cpu().numpy()])  # [T, bytes_per_row]
        if self.device.type != "cpu":
            rows = torch.from_numpy(rows).to(self.device)  # the same torch decode, on the device
        out = dequantize(rows, self.view.qtype, (len(rows), self.dim))
        return out.to(device=self.device, dtype=self.dtype)
