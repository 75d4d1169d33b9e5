"""Linear layers over GGUF weights.

On the CPU path a weight is dequantized once at load into the compute dtype; the GPU path keeps it in its
GGUF type and multiplies with kernels that dequantize on the fly (ksdk.kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ksdk.weights.gguf_file import TensorView

__all__ = ["Linear", "MLP", "load_dense"]


def load_dense(view: TensorView, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a whole (non-expert) tensor onto ``device``."""
    return view.dequantize(torch.float32).to(device=device, dtype=dtype)


class Linear(torch.nn.Module):
    """y = x @ W.T with W [out_features, in_features]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    @classmethod
    def from_view(cls, view: TensorView, device: torch.device, dtype: torch.dtype) -> Linear:
        return cls(load_dense(view, device, dtype))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class MLP(torch.nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
