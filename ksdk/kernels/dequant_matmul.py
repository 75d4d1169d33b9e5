"""y = x @ W.T with W kept in its GGUF quant blocks on the GPU, dequantized on the fly in registers.

W is the raw row-major GGUF bytes of one 2-D tensor, a uint8 tensor ``[N, bytes_per_row]``; each output
feature's row is a run of quant blocks. Two kernels share the per-type decoders below:

- ``_gemv_kernel`` for decode (M up to ``GEMV_MAX_M``): one program per N tile (times a split of K when N
  alone gives too few programs), the few activation rows broadcast against each dequantized tile;
- ``_gemm_kernel`` for prefill: M x N tiles, ``tl.dot`` on the dequantized tile in the activation dtype.

Both accumulate in fp32. The decoders follow the bit layouts of ``ksdk.weights.quants`` (whose torch
decoders are the reference, bit-exact with gguf-py); each element finds its block and fields by address,
so a K tile may span any whole number of 32-value groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf.constants import GGMLQuantizationType

from ksdk.kernels.launch import num_programs_wanted
from ksdk.weights.quants import bytes_per_row, dequantize

__all__ = ["GEMV_MAX_M", "KERNEL_QTYPES", "dequant_matmul", "dequant_matmul_reference"]

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
                   *, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] fp32|fp16|bf16 @ W.T, W given as GGUF bytes ``w_raw`` uint8 [N, bytes_per_row] -> [M, N] in x's dtype.

    ``split_k`` (GEMV path only) splits K over that many programs per N tile; by default enough to fill the GPU.
    """
    qtype = GGMLQuantizationType(qtype)
    _check(x, w_raw, qtype, in_features)
    M, K, N = x.shape[0], in_features, w_raw.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if M <= GEMV_MAX_M:
        BLOCK_N, BLOCK_K = 32, 64 if M <= 2 else 32
        n_tiles = triton.cdiv(N, BLOCK_N)
        k_tiles = triton.cdiv(K, BLOCK_K)
        if split_k is None:
            split_k = max(1, min(k_tiles, num_programs_wanted(x.device) // n_tiles))
        split_k = max(1, min(split_k, k_tiles))
        k_per_split = triton.cdiv(k_tiles, split_k) * BLOCK_K
        split_k = triton.cdiv(K, k_per_split)  # no empty splits
        partial = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        _gemv_kernel[(n_tiles, split_k)](
            x, w_raw, partial, M, N, K, x.stride(0), w_raw.stride(0), M * N, N, k_per_split,
            QTYPE=_QTYPE_ID[qtype], BLOCK_M=triton.next_power_of_2(M), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
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
