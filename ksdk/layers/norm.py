"""RMSNorm, computed in fp32 like the reference; on a GPU one Triton launch (ksdk.kernels.rms_norm)."""

from __future__ import annotations

import torch

__all__ = ["RMSNorm"]


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # the same roundings in one launch instead of about seven
            from ksdk.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): a pre-norm layer's residual add and the next norm, one launch on a GPU."""
        if x.is_cuda and delta.dtype == x.dtype and delta.shape == x.shape:  # else torch's promotion rules
            from ksdk.kernels.rms_norm import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)
