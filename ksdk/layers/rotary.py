"""Rotary position embedding on interleaved pairs, with DeepSeek's YaRN frequencies.

DeepSeek (and the GGUF converter, which keeps the checkpoint's layout) rotates adjacent pairs
(x0, x1), (x2, x3), ... The output is written de-interleaved (evens then odds) for q and k alike, which
leaves every q·k dot product unchanged and keeps the kernel a plain elementwise op.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ksdk.models.config import ModelConfig


__all__ = ["RotaryEmbedding", "yarn_inv_freq"]


def yarn_inv_freq(dim: int, base: float, factor: float, original_context: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """[dim/2] inverse frequencies: extrapolated for fast dims, interpolated by ``factor`` for slow ones."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    if factor <= 1.0:
        return extrapolated
    interpolated = 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return interpolated * (1 - keep) + extrapolated * keep


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        factor = config.rope_scaling_factor if config.rope_scaling_type == "yarn" else 1.0
        inv_freq = yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, factor,
                                 config.rope_original_context_length)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, rope_dim/2] in fp32."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., rope_dim] with cos/sin [T, rope_dim/2]: rotate pairs, output evens|odds."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
