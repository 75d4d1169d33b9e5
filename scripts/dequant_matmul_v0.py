"""The dequant_matmul kernels as of commit aae828c (before issue #6's rewrite), kept for before/after timings in
scripts/gemv_sweep.py and scripts/gemm_sweep.py.

(Original docstring:) y = x @ W.T with W kept in its GGUF quant blocks on the GPU, dequantized on the fly in registers.

W is the raw row-major GGUF bytes of one 2-D tensor, a uint8 tensor ``[N, bytes_per_row]``; each output
feature's row is a run of quant blocks. Three kernels share the per-type decoders below:

- ``_blocked_gemv_kernel`` for decode (M up to ``GEMV_MAX_M``) on Q8_0/Q4_K/Q6_K/Q5_0: one program per N tile
  (times a split of K when N alone gives too few programs), 256 inputs a step; each group's scale is decoded
  once and applied to the group's Σ q·x, so the per-weight work is a byte load, a shift and an FMA;
- ``_gemv_kernel``, the same launch for the other types: each element decodes its own scale fields;
- ``_gemm_kernel`` for prefill: M x N tiles, ``tl.dot`` on the dequantized tile in the activation dtype.

All accumulate in fp32. The decoders follow the bit layouts of ``ksdk.weights.quants`` (whose torch
decoders are the reference, bit-exact with gguf-py); each element finds its block and fields by address,
so a K tile may span any whole number of 32-value groups.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from gguf.constants import GGMLQuantizationType

from ksdk.kernels.launch import num_programs_wanted
from ksdk.weights.quants import bytes_per_row, dequantize

__all__ = ["BLOCKED_QTYPES", "GEMV_MAX_M", "KERNEL_QTYPES", "GemvConfig", "dequant_matmul", "dequant_matmul_reference", "gemv_config"]

Q = GGMLQuantizationType
KERNEL_QTYPES: tuple[GGMLQuantizationType, ...] = (Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0)
_QTYPE_ID = {q: i for i, q in enumerate(KERNEL_QTYPES)}  # the kernels' constexpr selector
GEMV_MAX_M = 8  # above this many rows the tiled tl.dot kernel wins
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequant_matmul_reference(x: torch.Tensor, w_raw: torch.Tensor, qtype: GGMLQuantizationType,
                             in_features: int) -> torch.Tensor:
    """The plain torch meaning of :func:`dequant_matmul`: dequantize all of W, then matmul in fp32."""
    w = dequantize(w_raw.cpu(), qtype, (w_raw.shape[0], in_features)).to(x.device)  # [N, K] fp32
    return (x.float() @ w.T).to(x.dtype)


# ---- decoders: row [BN, 1] uint8 pointers, k [1, BK] absolute element indices -> fp32 [BN, BK] ----


@triton.jit
def _f16_at(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return ((hi << 8) | lo).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _q8_0(row, k, mask):
    # d f16, qs int8[32]
    blk = row + (k // 32) * 34
    d = _f16_at(blk, mask)
    q = tl.load(blk + 2 + k % 32, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return q * d


@triton.jit
def _q5_0(row, k, mask):
    # d f16, qh u32 (bit e: element e's 5th bit), qs[16] (element e < 16: low nibble of qs[e], else high of qs[e-16])
    blk = row + (k // 32) * 22
    e = k % 32
    d = _f16_at(blk, mask)
    high = (_byte(blk + 2 + e // 8, mask) >> (e % 8)) & 1
    low = (_byte(blk + 6 + e % 16, mask) >> (4 * (e // 16))) & 0xF
    return d * ((low | (high << 4)) - 16).to(tl.float32)


@triton.jit
def _k_scale_min(blk, j, mask):
    """Sub-block j's 6-bit scale and min from the 12 packed bytes at blk + 4 (Q4_K, Q5_K)."""
    a = _byte(blk + 4 + j, mask)  # j < 4: the scale; j >= 4: the min's top 2 bits
    b = _byte(blk + 8 + j, mask)  # j < 4: the min; j >= 4: scale (low nibble) and min (high nibble)
    c = _byte(blk + 4 + (j + 4) % 8, mask)  # j >= 4: byte j-4, the scale's top 2 bits
    sc = tl.where(j < 4, a & 63, (b & 0xF) | ((c >> 6) << 4))
    mn = tl.where(j < 4, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q4_k(row, k, mask):
    # d, dmin, scales[12], qs[128]: sub-blocks 2c and 2c+1 are the low and high nibbles of qs[32c : 32c+32]
    blk = row + (k // 256) * 144
    e = k % 256
    j, l = e // 32, e % 32
    d = _f16_at(blk, mask)
    dmin = _f16_at(blk + 2, mask)
    sc, mn = _k_scale_min(blk, j, mask)
    q = (_byte(blk + 16 + (j // 2) * 32 + l, mask) >> (4 * (j % 2))) & 0xF
    return (d * sc) * q.to(tl.float32) - dmin * mn


@triton.jit
def _q5_k(row, k, mask):
    # d, dmin, scales[12], qh[32] (bit j of qh[l]: sub-block j), qs[128] as in Q4_K
    blk = row + (k // 256) * 176
    e = k % 256
    j, l = e // 32, e % 32
    d = _f16_at(blk, mask)
    dmin = _f16_at(blk + 2, mask)
    sc, mn = _k_scale_min(blk, j, mask)
    low = (_byte(blk + 48 + (j // 2) * 32 + l, mask) >> (4 * (j % 2))) & 0xF
    high = (_byte(blk + 16 + l, mask) >> j) & 1
    return (d * sc) * (low | (high << 4)).to(tl.float32) - dmin * mn


@triton.jit
def _q6_k(row, k, mask):
    # ql[128], qh[64], scales[16] int8, d: element e = 128h + 64n + l = 128h + 32t + m
    blk = row + (k // 256) * 210
    e = k % 256
    h, r = e // 128, e % 128
    low = (_byte(blk + h * 64 + r % 64, mask) >> (4 * (r // 64))) & 0xF
    high = (_byte(blk + 128 + h * 32 + r % 32, mask) >> (2 * (r // 32))) & 3
    sc = tl.load(blk + 192 + e // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = _f16_at(blk + 208, mask)
    return (d * sc) * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _dequant_tile(row, k, mask, QTYPE: tl.constexpr):
    if QTYPE == 0:
        w = _q8_0(row, k, mask)
    elif QTYPE == 1:
        w = _q4_k(row, k, mask)
    elif QTYPE == 2:
        w = _q5_k(row, k, mask)
    elif QTYPE == 3:
        w = _q6_k(row, k, mask)
    else:
        w = _q5_0(row, k, mask)
    return w


# ---- kernels ----


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om,
                 K_PER_SPLIT, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """out[split, m, n] = Σ_{k in this split} x[m, k] · W[n, k], for all M (<= BLOCK_M) rows at once."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m = tl.arange(0, BLOCK_M)  # [BM]
    row = w_ptr + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        w = _dequant_tile(row, k[None, :], (n[:, None] < N) & (k[None, :] < K), QTYPE)  # [BN, BK]
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K),
                    other=0.0).to(tl.float32)  # [BM, BK]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


# ---- blocked GEMV: one 256-value step per loop, scales decoded once per (row, group), quants as whole bytes ----
#
# Each helper returns the step's [BM, BN] contribution Σ_k x[m, k] · W[n, k] over k0 .. k0 + 255, factored as
# Σ_group scale · (Σ q·x) (- min · Σ x): the per-element work is a byte load, a shift and an FMA.


@triton.jit
def _x_groups(x_ptr, stride_xm, m, M, k0, K, G: tl.constexpr, L: tl.constexpr, GS: tl.constexpr):
    """x[m, k0 + GS·g + l] as fp32 [BM, G, L]."""
    k = k0 + tl.arange(0, G)[None, :, None] * GS + tl.arange(0, L)[None, None, :]
    mm = m[:, None, None]
    return tl.load(x_ptr + mm * stride_xm + k, mask=(mm < M) & (k < K), other=0.0).to(tl.float32)


@triton.jit
def _group_dots(x, q):
    """x [BM, G, L], q [BN, G, L] -> [BM, BN, G]: Σ_l x·q per row and group."""
    return tl.sum(x[:, None, :, :] * q[None, :, :, :], axis=3)


@triton.jit
def _q4_k_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K):
    blk = row + (k0 // 256) * 144  # [BN, 1]: one super-block
    c = tl.arange(0, 4)[None, :]  # qs[32c : 32c + 32] holds sub-blocks 2c (low nibbles) and 2c + 1 (high)
    q = _byte(blk[:, :, None] + 16 + c[:, :, None] * 32 + tl.arange(0, 32)[None, None, :], n_ok[:, :, None])
    x_lo = _x_groups(x_ptr, stride_xm, m, M, k0, K, 4, 32, 64)  # [BM, 4, 32]: sub-blocks 2c
    x_hi = _x_groups(x_ptr, stride_xm, m, M, k0 + 32, K, 4, 32, 64)  # sub-blocks 2c + 1
    dot_lo = _group_dots(x_lo, (q & 0xF).to(tl.float32))  # [BM, BN, 4]
    dot_hi = _group_dots(x_hi, (q >> 4).to(tl.float32))
    d = _f16_at(blk, n_ok)  # [BN, 1]
    dmin = _f16_at(blk + 2, n_ok)
    sc_lo, mn_lo = _k_scale_min(blk, 2 * c, n_ok)  # [BN, 4]
    sc_hi, mn_hi = _k_scale_min(blk, 2 * c + 1, n_ok)
    xs_lo = tl.sum(x_lo, axis=2)[:, None, :]  # [BM, 1, 4]
    xs_hi = tl.sum(x_hi, axis=2)[:, None, :]
    t = ((d * sc_lo)[None] * dot_lo + (d * sc_hi)[None] * dot_hi
         - (dmin * mn_lo)[None] * xs_lo - (dmin * mn_hi)[None] * xs_hi)
    return tl.sum(t, axis=2)


@triton.jit
def _q6_k_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K):
    blk = row + (k0 // 256) * 210  # [BN, 1]
    g = tl.arange(0, 16)[None, :, None]  # 16 groups of 16 values, one int8 scale each: e = 16g + l16
    h, t = g // 8, (g // 2) % 4  # e = 128h + 32t + l
    l = 16 * (g % 2) + tl.arange(0, 16)[None, None, :]
    blk3, ok3 = blk[:, :, None], n_ok[:, :, None]
    low = (_byte(blk3 + h * 64 + 32 * (t % 2) + l, ok3) >> (4 * (t // 2))) & 0xF
    high = (_byte(blk3 + 128 + h * 32 + l, ok3) >> (2 * t)) & 3
    q = ((low | (high << 4)) - 32).to(tl.float32)  # [BN, 16, 16]
    dots = _group_dots(_x_groups(x_ptr, stride_xm, m, M, k0, K, 16, 16, 16), q)  # [BM, BN, 16]
    sc = tl.load(blk + 192 + tl.arange(0, 16)[None, :], mask=n_ok, other=0).to(tl.int8, bitcast=True)
    ds = _f16_at(blk + 208, n_ok) * sc.to(tl.float32)  # [BN, 16]
    return tl.sum(ds[None] * dots, axis=2)


@triton.jit
def _q5_0_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K):
    b = tl.arange(0, 8)[None, :]  # 8 blocks of 32 values
    ok = n_ok & ((k0 + b * 32) < K)  # [BN, 8]
    blk = row + (k0 // 32 + b) * 22  # [BN, 8]
    e = tl.arange(0, 32)[None, None, :]
    blk3, ok3 = blk[:, :, None], ok[:, :, None]
    high = (_byte(blk3 + 2 + e // 8, ok3) >> (e % 8)) & 1
    low = (_byte(blk3 + 6 + e % 16, ok3) >> (4 * (e // 16))) & 0xF
    q = ((low | (high << 4)) - 16).to(tl.float32)  # [BN, 8, 32]
    dots = _group_dots(_x_groups(x_ptr, stride_xm, m, M, k0, K, 8, 32, 32), q)  # [BM, BN, 8]
    return tl.sum(_f16_at(blk, ok)[None] * dots, axis=2)


@triton.jit
def _q8_0_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K):
    b = tl.arange(0, 8)[None, :]
    ok = n_ok & ((k0 + b * 32) < K)
    blk = row + (k0 // 32 + b) * 34  # [BN, 8]
    q = tl.load(blk[:, :, None] + 2 + tl.arange(0, 32)[None, None, :], mask=ok[:, :, None], other=0)
    q = q.to(tl.int8, bitcast=True).to(tl.float32)  # [BN, 8, 32]
    dots = _group_dots(_x_groups(x_ptr, stride_xm, m, M, k0, K, 8, 32, 32), q)
    return tl.sum(_f16_at(blk, ok)[None] * dots, axis=2)


@triton.jit
def _blocked_gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om,
                         K_PER_SPLIT, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[split, m, n] = Σ_{k in this split} x[m, k] · W[n, k], 256 values of k per step (K_PER_SPLIT a multiple)."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m = tl.arange(0, BLOCK_M)  # [BM]
    row = w_ptr + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    n_ok = n[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = split * K_PER_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), 256):
        if QTYPE == 0:
            acc += _q8_0_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K)
        elif QTYPE == 1:
            acc += _q4_k_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K)
        elif QTYPE == 3:
            acc += _q6_k_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K)
        else:
            acc += _q5_0_step(row, n_ok, k0, x_ptr, stride_xm, m, M, K)
    out = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, QTYPE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """out[m, n] = x[m, :] · W[n, :] over one BLOCK_M x BLOCK_N tile."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = w_ptr + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)  # [BM, BK]
        w = _dequant_tile(row, k[None, :], (n[:, None] < N) & (k[None, :] < K), QTYPE)  # [BN, BK] fp32
        if IEEE:  # fp32 products, no TF32
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


# ---- launcher ----


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiles of a GEMV launch: one program covers ``block_n`` outputs and ``block_k`` inputs per loop step.

    ``blocked`` picks ``_blocked_gemv_kernel`` (types in ``BLOCKED_QTYPES``; its step is fixed at 256 inputs)
    over the per-element ``_gemv_kernel``.
    """

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    blocked: bool = True

    def __post_init__(self) -> None:
        if self.blocked and self.block_k != 256:
            raise ValueError(f"block_k={self.block_k}: the blocked kernel steps 256 inputs at a time")
        if self.block_k % 32 or self.block_n < 1 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n={self.block_n}, block_k={self.block_k}: need a power-of-2 block_n and "
                             f"block_k a multiple of 32")


BLOCKED_QTYPES: tuple[GGMLQuantizationType, ...] = (Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q5_0)


def gemv_config(qtype: GGMLQuantizationType, M: int, N: int, K: int) -> GemvConfig:
    """The GEMV tiles for one call's shape, the best of ``scripts/gemv_sweep.py`` on an H100 over R1's shapes
    (batch 1: 200-500 GB/s of weight bytes where the per-element kernel read 40-80)."""
    if qtype not in BLOCKED_QTYPES:
        return GemvConfig(8, 256, 4, blocked=False)
    if qtype == Q.Q5_0:  # eight 22-byte blocks a step: more rows per program cost registers, not bandwidth
        return GemvConfig(4, 256, 4)
    return GemvConfig(16 if M <= 4 else 8, 256, 4)


def _check(x: torch.Tensor, w_raw: torch.Tensor, qtype: GGMLQuantizationType, in_features: int) -> None:
    if qtype not in _QTYPE_ID:
        raise ValueError(f"qtype {qtype.name} has no kernel; allowed: {', '.join(q.name for q in KERNEL_QTYPES)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x is {x.dtype}; allowed: float32, float16, bfloat16")
    if x.dim() != 2 or x.shape[1] != in_features or x.stride(1) != 1:
        raise ValueError(f"x is {tuple(x.shape)} with strides {x.stride()}; expected [M, {in_features}], unit stride")
    row_bytes = bytes_per_row(qtype, in_features)
    if w_raw.dtype != torch.uint8 or w_raw.dim() != 2 or w_raw.shape[1] != row_bytes or w_raw.stride(1) != 1:
        raise ValueError(f"w_raw is {w_raw.dtype} {tuple(w_raw.shape)} with strides {w_raw.stride()}; "
                         f"expected uint8 [N, {row_bytes}] ({qtype.name} rows of {in_features}), unit stride")
    if x.device != w_raw.device:
        raise ValueError(f"x is on {x.device} but w_raw on {w_raw.device}")


def dequant_matmul(x: torch.Tensor, w_raw: torch.Tensor, qtype: GGMLQuantizationType, in_features: int,
                   *, split_k: int | None = None, gemv: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] fp32|fp16|bf16 @ W.T, W given as GGUF bytes ``w_raw`` uint8 [N, bytes_per_row] -> [M, N] in x's dtype.

    ``split_k`` (GEMV path only) splits K over that many programs per N tile; by default enough to fill the GPU.
    ``gemv`` overrides the GEMV path's tile sizes (default: :func:`gemv_config`).
    """
    qtype = GGMLQuantizationType(qtype)
    _check(x, w_raw, qtype, in_features)
    M, K, N = x.shape[0], in_features, w_raw.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if M <= GEMV_MAX_M:
        cfg = gemv or gemv_config(qtype, M, N, K)
        if cfg.blocked and qtype not in BLOCKED_QTYPES:
            raise ValueError(f"{qtype.name} has no blocked GEMV; allowed: {', '.join(q.name for q in BLOCKED_QTYPES)}")
        BLOCK_N, BLOCK_K = cfg.block_n, cfg.block_k
        n_tiles = triton.cdiv(N, BLOCK_N)
        k_tiles = triton.cdiv(K, BLOCK_K)
        if split_k is None:
            split_k = max(1, min(k_tiles, num_programs_wanted(x.device) // n_tiles))
        split_k = max(1, min(split_k, k_tiles))
        k_per_split = triton.cdiv(k_tiles, split_k) * BLOCK_K
        split_k = triton.cdiv(K, k_per_split)  # no empty splits
        partial = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        args = (x, w_raw, partial, M, N, K, x.stride(0), w_raw.stride(0), M * N, N, k_per_split)
        if cfg.blocked:
            _blocked_gemv_kernel[(n_tiles, split_k)](
                *args, QTYPE=_QTYPE_ID[qtype], BLOCK_M=triton.next_power_of_2(M), BLOCK_N=BLOCK_N,
                num_warps=cfg.num_warps,
            )
        else:
            _gemv_kernel[(n_tiles, split_k)](
                *args, QTYPE=_QTYPE_ID[qtype], BLOCK_M=triton.next_power_of_2(M), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                num_warps=cfg.num_warps,
            )
        if split_k > 1:
            out.copy_(partial.sum(0))
        return out
    BLOCK_M, BLOCK_N, BLOCK_K = (64, 64, 64) if M >= 64 else (16, 64, 64)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _gemm_kernel[grid](
        x, w_raw, out, M, N, K, x.stride(0), w_raw.stride(0), out.stride(0), QTYPE=_QTYPE_ID[qtype],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        # Triton's CPU interpreter gets bf16 tl.dot wrong (triton 3.9): it computes in fp32 there.
        IEEE=x.dtype == torch.float32 or x.device.type == "cpu",
    )
    return out
