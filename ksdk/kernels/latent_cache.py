"""MLA's latent cache write in one launch: normalize c_kv, rotate k_pe, store both at each token's slot.

For token t with kv[t] = [c_kv (rank) | k_pe (rope)] from W_kva·x:
``kv_pages.flat[slot[t]] = [RMSNorm(c_kv) | rope(k_pe)]`` cast to the cache's dtype, with the RMSNorm of
:mod:`ksdk.kernels.rms_norm` and the de-interleaving rotation of :mod:`ksdk.kernels.rotary` (same roundings).
This replaces a norm, a rotation, a concatenation, a cast and an indexed write (about 15 kernels at decode).
Tokens with a negative slot are skipped (the torch indexing would wrap them to the pool's end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ksdk.kernels.rms_norm import normalize_row, rms_norm_reference
from ksdk.kernels.rotary import rotary_reference, rotate_pairs
from ksdk.kernels.rounding import round_to

__all__ = ["write_latent", "write_latent_reference"]


def write_latent_reference(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                           sin: torch.Tensor, kv_pages: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """MLAttention's eager steps: norm, rotate, concatenate, cast, indexed write."""
    rank = weight.shape[0]
    latent = torch.cat((rms_norm_reference(kv[:, :rank], weight, eps), rotary_reference(kv[:, rank:], cos, sin)), -1)
    kv_pages.view(-1, latent.shape[-1])[slot_mapping] = latent.to(kv_pages.dtype)


@triton.jit
def _write_latent_kernel(kv_ptr, w_ptr, cos_ptr, sin_ptr, pages_ptr, slot_ptr, stride_kv, stride_ct, stride_st,
                         stride_slot, eps, RANK: tl.constexpr, HALF: tl.constexpr, C_ROUND: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        row = kv_ptr + t * stride_kv
        out = pages_ptr + slot * stride_slot
        r = tl.arange(0, BLOCK_R)
        r_ok = r < RANK
        c_kv = tl.load(row + r, mask=r_ok, other=0.0)
        w = tl.load(w_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
        y = normalize_row(c_kv.to(tl.float32), w, RANK, eps, c_kv.dtype)
        if C_ROUND:  # torch's weight * x result is x's dtype (else fp32: no rounding before the cache cast)
            y = round_to(y, c_kv.dtype)
        tl.store(out + r, round_to(y, pages_ptr.dtype.element_ty).to(pages_ptr.dtype.element_ty), mask=r_ok)
        i = tl.arange(0, BLOCK_P)
        i_ok = i < HALF
        even = tl.load(row + RANK + 2 * i, mask=i_ok, other=0.0)
        odd = tl.load(row + RANK + 2 * i + 1, mask=i_ok, other=0.0)
        cos = tl.load(cos_ptr + t * stride_ct + i, mask=i_ok, other=0.0)
        sin = tl.load(sin_ptr + t * stride_st + i, mask=i_ok, other=0.0)
        first, second = rotate_pairs(even.to(tl.float32), odd.to(tl.float32), cos, sin, even.dtype)
        tl.store(out + RANK + i, first.to(pages_ptr.dtype.element_ty), mask=i_ok)
        tl.store(out + RANK + HALF + i, second.to(pages_ptr.dtype.element_ty), mask=i_ok)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def write_latent(kv: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 kv_pages: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv [T, rank + rope] (unit last stride), norm weight [rank], cos/sin [T, rope/2] fp32, page pool
    kv_pages [num_pages, page_size, rank + rope] (contiguous), slot_mapping [T] int64: one launch."""
    if kv.dim() != 2 or kv.stride(1) != 1 or kv.dtype not in _DTYPES:
        raise ValueError(f"kv is {kv.dtype} {tuple(kv.shape)} with strides {kv.stride()}; "
                         "expected float [T, rank + rope] with unit last stride")
    T, width = kv.shape
    rank = weight.shape[0] if weight.dim() == 1 else -1
    half = (width - rank) // 2
    if rank <= 0 or width - rank <= 0 or (width - rank) % 2 or not weight.is_contiguous() or weight.dtype not in _DTYPES:
        raise ValueError(f"weight is {weight.dtype} {tuple(weight.shape)}; expected a contiguous float [rank] "
                         f"leaving an even, positive rope part of kv's {width} columns")
    if kv_pages.dim() != 3 or kv_pages.shape[2] != width or not kv_pages.is_contiguous() or kv_pages.dtype not in _DTYPES:
        raise ValueError(f"kv_pages is {kv_pages.dtype} {tuple(kv_pages.shape)}; "
                         f"expected a contiguous float [num_pages, page_size, {width}]")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (T,) or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping is {slot_mapping.dtype} {tuple(slot_mapping.shape)}; "
                         f"expected contiguous int64 [{T}]")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.shape != (T, half) or t.stride(1) != 1:
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}; expected float32 [{T}, {half}], unit last stride")
    devices = {t.device for t in (kv, weight, cos, sin, kv_pages, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"inputs are on several devices: {sorted(map(str, devices))}")
    if T == 0:
        return
    _write_latent_kernel[(T,)](
        kv, weight, cos, sin, kv_pages, slot_mapping, kv.stride(0), cos.stride(0), sin.stride(0),
        kv_pages.stride(1), eps, RANK=rank, HALF=half, C_ROUND=torch.promote_types(weight.dtype, kv.dtype) == kv.dtype,
        BLOCK_R=triton.next_power_of_2(rank), BLOCK_P=triton.next_power_of_2(half), num_warps=4,
    )
