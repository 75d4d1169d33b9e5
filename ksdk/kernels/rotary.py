"""Rotary embedding on interleaved pairs, applied in place in one launch.

For each token t and pair i of a row x [..., R] (R = rope dim), with c = cos[t, i] and s = sin[t, i] rounded to
x's dtype: ``out[i] = x[2i]·c − x[2i+1]·s`` and ``out[R/2 + i] = x[2i+1]·c + x[2i]·s``, written de-interleaved
(evens then odds) over x itself. Every product and sum is rounded to x's dtype, as the eager torch ops of
:meth:`ksdk.layers.rotary.RotaryEmbedding.apply` (the reference) round them (:mod:`ksdk.kernels.rounding`), so
bf16 results are bit-identical; in fp32 (and possibly fp16) a fused multiply-add the compiler may form moves
the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ksdk.kernels.rounding import round_to

__all__ = ["rotary_", "rotary_reference"]


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., R], cos/sin [T, R/2] -> the rotated copy (RotaryEmbedding.apply)."""
    from ksdk.layers.rotary import RotaryEmbedding

    return RotaryEmbedding.apply(x, cos, sin)


@triton.jit
def rotate_pairs(even, odd, cos, sin, ROUND: tl.constexpr):
    """fp32 pairs and fp32 cos/sin -> (first half, second half) in fp32, every step rounded to ``ROUND``
    (the storage dtype the eager torch ops would produce at each step)."""
    c, s = round_to(cos, ROUND), round_to(sin, ROUND)
    ec, os_ = round_to(even * c, ROUND), round_to(odd * s, ROUND)
    oc, es = round_to(odd * c, ROUND), round_to(even * s, ROUND)
    return round_to(ec - os_, ROUND), round_to(oc + es, ROUND)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, n_heads, stride_xt, stride_xh, stride_ct, stride_st,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_P)
    ok = (h[:, None] < n_heads) & (i[None, :] < HALF)
    row = x_ptr + t * stride_xt + h[:, None] * stride_xh  # [BH, 1]
    even = tl.load(row + 2 * i[None, :], mask=ok, other=0.0)
    odd = tl.load(row + 2 * i[None, :] + 1, mask=ok, other=0.0)
    cos = tl.load(cos_ptr + t * stride_ct + i, mask=i < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + i, mask=i < HALF, other=0.0)[None, :]
    first, second = rotate_pairs(even.to(tl.float32), odd.to(tl.float32), cos, sin, even.dtype)
    # Both halves were loaded above: overwriting the row now is safe (each program owns its rows).
    tl.store(row + i[None, :], first.to(even.dtype), mask=ok)
    tl.store(row + HALF + i[None, :], second.to(even.dtype), mask=ok)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, R] or [T, H, R] in place (any strides but a unit last one); cos/sin [T, R/2] fp32.
    Returns x, now holding rotary_reference(x, cos, sin)."""
    if x.dim() not in (2, 3) or x.stride(-1) != 1 or x.shape[-1] % 2:
        raise ValueError(f"x {tuple(x.shape)} with strides {x.stride()}: expected [T, R] or [T, H, R], "
                         "R even, unit last stride")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x is {x.dtype}; allowed: float32, float16, bfloat16")
    T, half = x.shape[0], x.shape[-1] // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.shape != (T, half) or t.stride(1) != 1 or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)} on {t.device}; "
                             f"expected float32 [{T}, {half}] with unit last stride on {x.device}")
    x3 = x if x.dim() == 3 else x[:, None]
    heads = x3.shape[1]
    if T > 0 and heads > 0:
        block_h = min(16, triton.next_power_of_2(heads))
        _rotary_kernel[(T, triton.cdiv(heads, block_h))](
            x3, cos, sin, heads, x3.stride(0), x3.stride(1), cos.stride(0), sin.stride(0),
            HALF=half, BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(half), num_warps=1,
        )
    return x
