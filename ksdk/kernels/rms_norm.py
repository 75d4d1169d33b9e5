"""RMSNorm in one launch, optionally after the residual add that precedes it in a pre-norm layer.

Per row x of N values: ``y = w ⊙ round(x · rsqrt(Σ x² / N + eps))``, in fp32, where round() casts to x's dtype
as :class:`ksdk.layers.norm.RMSNorm` does before its multiply by the weight; y has the dtype torch promotes
``w * x`` to. The fused form first replaces x by ``s = round(x + delta)`` (the residual stream after a
sub-layer's output ``delta``), writes s and returns both. Torch's eager ops round at the same places, so the
kernel differs from :func:`rms_norm_reference` only in the order of the sum of squares (fp32 rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ksdk.kernels.rounding import round_to

__all__ = ["add_rms_norm", "add_rms_norm_reference", "rms_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm.forward's math: fp32 statistics, normalized values rounded to x's dtype, then times the weight."""
    dtype = x.dtype
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) as two eager torch steps."""
    s = x + delta
    return s, rms_norm_reference(s, weight, eps)


@triton.jit
def normalize_row(x, w, n_cols, eps, ROUND: tl.constexpr):
    """x [BLOCK] fp32 (zero past n_cols), w [BLOCK] fp32 -> w · round(x · rsqrt(mean(x²) + eps)) in fp32;
    ``ROUND`` is x's storage dtype (rounding to it is what the torch code does before the multiply)."""
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n_cols + eps)
    return w * round_to(x * rstd, ROUND)


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, sum_ptr, w_ptr, y_ptr, n_cols, stride_x, stride_d, stride_s, stride_y, eps,
                     HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:  # the residual add, rounded to the stream's dtype as torch's add is
        d = tl.load(delta_ptr + row * stride_d + cols, mask=ok, other=0.0)
        x = round_to(x.to(tl.float32) + d.to(tl.float32), x.dtype).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = round_to(normalize_row(x.to(tl.float32), w, n_cols, eps, x.dtype), y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x [..., N] -> a [rows, N] view (a copy only if the leading dims cannot be flattened)."""
    if x.dim() == 0 or x.stride(-1) != 1:
        raise ValueError(f"{name} {tuple(x.shape)} with strides {x.stride()} needs a unit stride in its last dim")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} is {x.dtype}; allowed: float32, float16, bfloat16")
    return x.reshape(-1, x.shape[-1])


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    x2 = _rows(x, "x")
    n = x2.shape[1]
    if weight.shape != (n,) or not weight.is_contiguous() or weight.dtype not in _DTYPES:
        raise ValueError(f"weight is {weight.dtype} {tuple(weight.shape)}; expected a contiguous float [{n}]")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    y2 = y.view(-1, n)
    d2 = s = s2 = None
    if delta is not None:
        if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
            raise ValueError(f"delta is {delta.dtype} {tuple(delta.shape)} on {delta.device}; "
                             f"expected {x.dtype} {tuple(x.shape)} on {x.device}")
        d2 = _rows(delta, "delta")
        s = torch.empty_like(x, memory_format=torch.contiguous_format)
        s2 = s.view(-1, n)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2 if d2 is None else d2, y2 if s2 is None else s2, weight, y2, n, x2.stride(0),
            0 if d2 is None else d2.stride(0), 0 if s2 is None else s2.stride(0), y2.stride(0), eps,
            HAS_DELTA=d2 is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return s, y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] (unit last stride, any row stride) with weight [N]: one launch."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) in one launch; x and delta alike in shape and dtype."""
    s, y = _launch(x, delta, weight, eps)
    assert s is not None
    return s, y
