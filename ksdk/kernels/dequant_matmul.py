"""y = x @ W.T with W kept in its GGUF quant blocks on the GPU, dequantized on the fly in registers.

W is the raw row-major GGUF bytes of one 2-D tensor, a uint8 tensor ``[N, bytes_per_row]``; each output
feature's row is a run of quant blocks. The tile kernels walk K in steps of ``block_k`` values and multiply a
dequantized [block_n, block_k] tile on the tensor cores in x's dtype (fp32 accumulation):

- ``_gemv_kernel`` for decode (M up to ``GEMV_MAX_M``, padded to 16): one program per N tile times a split of
  K; splits write fp32 partials that ``_sum_splits_kernel`` adds in a fixed order (deterministic). Decode
  speed is set by the instructions spent per weight, not by the multiply: even at M = 1 the tensor cores beat
  fp32 FMAs, whose per-group sums reduce across threads. fp32 x takes the FMA path (``dot=False``), which
  keeps fp32 products.
- ``gemv_rows_kernel`` (``ksdk.kernels.gemv_rows``), the other decode kernel (``GemvConfig(kind="rows")``):
  each thread owns whole rows of W, so no sum crosses threads, and decodes 256 values of a row at static byte
  positions into exact fp32 FMAs (about 4-6 instructions a weight at M = 1, against 8-18 for the tensor-core
  tiles; each extra row of x adds 2-3).
- ``_gemm_kernel`` for prefill: M x N tiles.

The tile decoders read each quant byte once: Q4_K/Q5_K as 16-byte runs of 32 quant bytes split into the
low- and high-nibble sub-blocks (two dots a step); Q8_0, Q5_0 and Q6_K, whose blocks are only 2-byte aligned
(34, 22, 210 bytes), as uint16 pairs unpacked with ``tl.join`` so the tile stays in natural k order. Scale
fields are decoded once per (row, group). The torch decoders of ``ksdk.weights.quants`` are the reference.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from gguf.constants import GGMLQuantizationType

from ksdk.kernels.gemv_rows import gemv_rows_kernel
from ksdk.kernels.launch import num_programs_wanted
from ksdk.weights.quants import bytes_per_row, dequantize

__all__ = [
    "GEMV_MAX_M",
    "KERNEL_QTYPES",
    "GemmConfig",
    "GemvConfig",
    "dequant_matmul",
    "dequant_matmul_reference",
    "gemm_config",
    "gemv_config",
]

Q = GGMLQuantizationType
KERNEL_QTYPES: tuple[GGMLQuantizationType, ...] = (Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0)
_QTYPE_ID = {q: i for i, q in enumerate(KERNEL_QTYPES)}  # the kernels' constexpr selector
_GROUP = {Q.Q8_0: 32, Q.Q4_K: 32, Q.Q5_K: 32, Q.Q6_K: 16, Q.Q5_0: 32}  # values sharing one scale
GEMV_MAX_M = 8  # above this many rows the tiled tl.dot kernel wins
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequant_matmul_reference(x: torch.Tensor, w_raw: torch.Tensor, qtype: GGMLQuantizationType,
                             in_features: int) -> torch.Tensor:
    """The plain torch meaning of :func:`dequant_matmul`: dequantize all of W, then matmul in fp32."""
    w = dequantize(w_raw.cpu(), qtype, (w_raw.shape[0], in_features)).to(x.device)  # [N, K] fp32
    return (x.float() @ w.T).to(x.dtype)


# ---- group decoders (the fp32 FMA path): blk/ok [BN, G] (a group's block address, in range), [BN, G, L] quants ----
#
# Each returns (q, scale, offset): fp32 [BN, G, L] quant values and fp32 [BN, G] per-group factors, the
# weights being scale · q - offset (offset is zero but for the types with a min).


@triton.jit
def _f16_at(ptr, mask):
    """The f16 at ``ptr`` (2-byte aligned in every block type) as fp32."""
    h = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


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
def _q8_0_groups(row, ok, ga):
    # block ga: d f16, qs int8[32]
    blk = row + ga * 34
    l = tl.arange(0, 32)[None, None, :]
    q = tl.load(blk[:, :, None] + 2 + l, mask=ok[:, :, None], other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = _f16_at(blk, ok)
    return q, d, d


@triton.jit
def _q5_0_groups(row, ok, ga):
    # block ga: d f16, qh u32 (bit e: element e's 5th bit), qs[16] (e < 16: low nibble of qs[e], else high of qs[e-16])
    blk = row + ga * 22
    e = tl.arange(0, 32)[None, None, :]
    blk3, ok3 = blk[:, :, None], ok[:, :, None]
    high = (_byte(blk3 + 2 + e // 8, ok3) >> (e % 8)) & 1
    low = (_byte(blk3 + 6 + e % 16, ok3) >> (4 * (e // 16))) & 0xF
    d = _f16_at(blk, ok)
    return ((low | (high << 4)) - 16).to(tl.float32), d, d


@triton.jit
def _q4_k_groups(row, ok, ga):
    # 144-byte blocks of 8 sub-blocks: d, dmin, scales[12], qs[128]; sub-blocks 2c, 2c+1 are the low and
    # high nibbles of qs[32c : 32c+32]
    blk = row + (ga // 8) * 144
    j = ga % 8
    j3 = j[:, :, None]
    l = tl.arange(0, 32)[None, None, :]
    q = (_byte(blk[:, :, None] + 16 + (j3 // 2) * 32 + l, ok[:, :, None]) >> (4 * (j3 % 2))) & 0xF
    sc, mn = _k_scale_min(blk, j, ok)
    return q.to(tl.float32), _f16_at(blk, ok) * sc, _f16_at(blk + 2, ok) * mn


@triton.jit
def _q5_k_groups(row, ok, ga):
    # 176-byte blocks: d, dmin, scales[12], qh[32] (bit j of qh[l]: sub-block j), qs[128] as in Q4_K
    blk = row + (ga // 8) * 176
    j = ga % 8
    j3, blk3, ok3 = j[:, :, None], blk[:, :, None], ok[:, :, None]
    l = tl.arange(0, 32)[None, None, :]
    low = (_byte(blk3 + 48 + (j3 // 2) * 32 + l, ok3) >> (4 * (j3 % 2))) & 0xF
    high = (_byte(blk3 + 16 + l, ok3) >> j3) & 1
    sc, mn = _k_scale_min(blk, j, ok)
    return (low | (high << 4)).to(tl.float32), _f16_at(blk, ok) * sc, _f16_at(blk + 2, ok) * mn


@triton.jit
def _q6_k_groups(row, ok, ga):
    # 210-byte blocks of 16 groups of 16: ql[128], qh[64], scales[16] int8, d. Group g's values e = 16g + l16
    # = 128h + 32t + l sit in the nibble t // 2 of ql[64h + 32(t % 2) + l] and the bits 2t of qh[32h + l].
    blk = row + (ga // 16) * 210
    g = ga % 16
    g3, blk3, ok3 = g[:, :, None], blk[:, :, None], ok[:, :, None]
    h, t = g3 // 8, (g3 // 2) % 4
    l = 16 * (g3 % 2) + tl.arange(0, 16)[None, None, :]
    low = (_byte(blk3 + h * 64 + 32 * (t % 2) + l, ok3) >> (4 * (t // 2))) & 0xF
    high = (_byte(blk3 + 128 + h * 32 + l, ok3) >> (2 * t)) & 3
    sc = tl.load(blk + 192 + g, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    ds = _f16_at(blk + 208, ok) * sc
    return ((low | (high << 4)) - 32).to(tl.float32), ds, ds


@triton.jit
def _groups(row, n_ok, k0, K, QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """The G groups of L values starting at k0 (a multiple of L) for rows ``row`` [BN, 1]: (q, scale, offset)."""
    ga = k0 // L + tl.arange(0, G)[None, :]  # [1, G] absolute group index in the row
    ok = n_ok & (ga < K // L)  # [BN, G]
    if QTYPE == 0:
        q, s, o = _q8_0_groups(row, ok, ga)
    elif QTYPE == 1:
        q, s, o = _q4_k_groups(row, ok, ga)
    elif QTYPE == 2:
        q, s, o = _q5_k_groups(row, ok, ga)
    elif QTYPE == 3:
        q, s, o = _q6_k_groups(row, ok, ga)
    else:
        q, s, o = _q5_0_groups(row, ok, ga)
    return q, s, o


# ---- tile decoders for the tensor-core paths: W[rows, k0 : k0 + BK] in natural k order, fp32 [BN, BK] ----
#
# Q8_0, Q5_0 and Q6_K blocks are 2-byte aligned only (34, 22, 210 bytes), so their quants are read as uint16
# pairs (half the loads and address math of bytes) and unpacked by shifts into trailing tl.join dims (kept
# within a thread) whose row-major order is the natural k order.


@triton.jit
def _u16(ptr, offset, mask):
    """The uint16 at byte address ``ptr`` (2-byte aligned) plus ``offset`` uint16s, as int32."""
    return tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offset, mask=mask, other=0).to(tl.int32)


@triton.jit
def _q8_0_tile(row, n_ok, k0, K, G: tl.constexpr):
    ga = k0 // 32 + tl.arange(0, G)[None, :]  # [1, G] blocks
    ok = n_ok & (ga < K // 32)  # [BN, G]
    blk = row + ga * 34
    h = _u16(blk[:, :, None] + 2, tl.arange(0, 16)[None, None, :], ok[:, :, None])  # [BN, G, 16]: quants 2i, 2i+1
    q = tl.join((h << 24) >> 24, (h << 16) >> 24)  # [BN, G, 16, 2] sign-extended int8
    w = _f16_at(blk, ok)[:, :, None, None] * q.to(tl.float32)
    return tl.reshape(w, (w.shape[0], G * 32))


@triton.jit
def _q5_0_tile(row, n_ok, k0, K, G: tl.constexpr):
    ga = k0 // 32 + tl.arange(0, G)[None, :]
    ok = n_ok & (ga < K // 32)
    blk = row + ga * 22
    i = tl.arange(0, 8)[None, None, :]
    h = _u16(blk[:, :, None] + 6, i, ok[:, :, None])  # [BN, G, 8]: qs[2i], qs[2i+1]
    qh = (_u16(blk, 1, ok) | (_u16(blk, 2, ok) << 16))[:, :, None]  # [BN, G, 1]: bit e is element e's 5th bit
    # element e = 16·half + 2i + p is nibble `half` of qs[2i + p]
    v00 = (h & 0xF) | (((qh >> (2 * i)) & 1) << 4)
    v01 = ((h >> 8) & 0xF) | (((qh >> (2 * i + 1)) & 1) << 4)
    v10 = ((h >> 4) & 0xF) | (((qh >> (2 * i + 16)) & 1) << 4)
    v11 = ((h >> 12) & 0xF) | (((qh >> (2 * i + 17)) & 1) << 4)
    q = tl.permute(tl.join(tl.join(v00, v01), tl.join(v10, v11)), (0, 1, 4, 2, 3))  # [BN, G, half, i, p]
    d = _f16_at(blk, ok)[:, :, None, None, None]
    w = d * q.to(tl.float32) - 16.0 * d
    return tl.reshape(w, (w.shape[0], G * 32))


@triton.jit
def _q6_k_tile(row, n_ok, k0, K, HT: tl.constexpr):
    # HT runs of 32 values; run r = 4h + t of a block holds e = 128h + 32t + l, l = 16·ih + 2·il + p
    ra = k0 // 32 + tl.arange(0, HT)[None, :]  # [1, HT] absolute run index
    ok = n_ok & (ra < K // 32)  # [BN, HT]
    blk = row + (ra // 8) * 210
    r = ra % 8
    h, t = r // 4, r % 4  # [1, HT]
    i = 8 * tl.arange(0, 2)[None, None, :, None] + tl.arange(0, 8)[None, None, None, :]  # [1, 1, 2, 8]: l // 2
    ok4 = ok[:, :, None, None]
    low_w = _u16(blk[:, :, None, None] + (64 * h + 32 * (t % 2))[:, :, None, None], i, ok4)  # ql[l], ql[l + 1]
    high_w = _u16(blk[:, :, None, None] + (128 + 32 * h)[:, :, None, None], i, ok4)  # qh[l], qh[l + 1]
    t4 = t[:, :, None, None]
    low_w = low_w >> (4 * (t4 // 2))
    high_w = high_w >> (2 * t4)
    q = tl.join((low_w & 0xF) | ((high_w & 3) << 4), ((low_w >> 8) & 0xF) | (((high_w >> 8) & 3) << 4))
    ih = tl.arange(0, 2)[None, None, :]
    sc = tl.load(blk[:, :, None] + 192 + (8 * h + 2 * t)[:, :, None] + ih, mask=ok[:, :, None], other=0)
    ds = _f16_at(blk + 208, ok)[:, :, None] * sc.to(tl.int8, bitcast=True).to(tl.float32)  # [BN, HT, 2]
    ds = ds[:, :, :, None, None]
    w = ds * q.to(tl.float32) - 32.0 * ds  # [BN, HT, 2, 8, 2]
    return tl.reshape(w, (w.shape[0], HT * 32))


@triton.jit
def _k_halves(row, n_ok, k0, K, QTYPE: tl.constexpr, C: tl.constexpr):
    """Q4_K/Q5_K: the C 64-value chunks from k0 (a multiple of 64) as two fp32 [BN, C·32] tiles, sub-blocks 2c
    (low nibbles) and 2c + 1 (high nibbles) of each chunk's 32 quant bytes, so every byte is loaded once;
    tile element (c, l) holds W[:, k0 + 64c + l] and W[:, k0 + 64c + 32 + l]."""
    ca = k0 // 64 + tl.arange(0, C)[None, :]  # [1, C] absolute chunk index
    ok = n_ok & (ca < K // 64)  # [BN, C]
    jc = ca % 4
    l = tl.arange(0, 32)[None, None, :]
    if QTYPE == 1:
        blk = row + (ca // 4) * 144
        b = _byte(blk[:, :, None] + 16 + jc[:, :, None] * 32 + l, ok[:, :, None])  # [BN, C, 32]
        lo, hi = b & 0xF, b >> 4
    else:
        blk = row + (ca // 4) * 176
        b = _byte(blk[:, :, None] + 48 + jc[:, :, None] * 32 + l, ok[:, :, None])
        qh = _byte(blk[:, :, None] + 16 + l, ok[:, :, None]) >> (2 * jc[:, :, None])
        lo, hi = (b & 0xF) | ((qh & 1) << 4), (b >> 4) | ((qh & 2) << 3)
    d, dmin = _f16_at(blk, ok), _f16_at(blk + 2, ok)
    sc_lo, mn_lo = _k_scale_min(blk, 2 * jc, ok)
    sc_hi, mn_hi = _k_scale_min(blk, 2 * jc + 1, ok)
    w_lo = (d * sc_lo)[:, :, None] * lo.to(tl.float32) - (dmin * mn_lo)[:, :, None]
    w_hi = (d * sc_hi)[:, :, None] * hi.to(tl.float32) - (dmin * mn_hi)[:, :, None]
    return tl.reshape(w_lo, (w_lo.shape[0], C * 32)), tl.reshape(w_hi, (w_hi.shape[0], C * 32))


@triton.jit
def _dot_acc(w, x, acc, IEEE: tl.constexpr):
    """acc + w [BN, BK] @ x.T (x [BM, BK]): on the tensor cores in x's dtype; in fp32 in the interpreter
    (the weights rounded to x's dtype all the same)."""
    if IEEE:
        return tl.dot(w.to(x.dtype).to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(w.to(x.dtype), tl.trans(x), acc)


@triton.jit
def _dot_acc_x(x, w, acc, IEEE: tl.constexpr):
    """acc + x [BM, BK] @ w.T (w [BN, BK] fp32), as :func:`_dot_acc`; IEEE keeps fp32 x exact."""
    if IEEE:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc)


@triton.jit
def _w_tile(row, n_ok, k0, K, QTYPE: tl.constexpr, BK: tl.constexpr):
    """W[rows, k0 : k0 + BK] dequantized, fp32 [BN, BK] (zeros past K), for Q8_0, Q6_K and Q5_0 (Q4_K and Q5_K
    go through :func:`_k_halves`)."""
    if QTYPE == 0:
        w = _q8_0_tile(row, n_ok, k0, K, BK // 32)
    elif QTYPE == 3:
        w = _q6_k_tile(row, n_ok, k0, K, BK // 32)
    else:
        w = _q5_0_tile(row, n_ok, k0, K, BK // 32)
    return w


@triton.jit
def _gemv_dot_step(acc_t, row, n_ok, x_rows, m_ok, k0, K, QTYPE: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """acc_t [BN, BM] + W[rows, k0 : k0 + BK] @ x[:, k0 : k0 + BK].T, x's rows at ``x_rows`` [BM, 1] (those with
    ``m_ok`` False read as zeros): one K step of the tensor-core GEMV."""
    if QTYPE == 1 or QTYPE == 2:
        w_lo, w_hi = _k_halves(row, n_ok, k0, K, QTYPE, BK // 64)
        k = k0 + 64 * (tl.arange(0, BK // 2) // 32) + tl.arange(0, BK // 2) % 32  # [BK / 2]
        x_mask = m_ok & (k[None, :] < K)
        acc_t = _dot_acc(w_lo, tl.load(x_rows + k[None, :], mask=x_mask, other=0.0), acc_t, IEEE)
        acc_t = _dot_acc(w_hi, tl.load(x_rows + 32 + k[None, :], mask=x_mask, other=0.0), acc_t, IEEE)
    else:
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)  # [BM, BK]
        acc_t = _dot_acc(_w_tile(row, n_ok, k0, K, QTYPE, BK), x, acc_t, IEEE)
    return acc_t


# ---- kernels ----


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om, K_PER_SPLIT,
                 QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
    """out[split, m, n] = Σ_{k in this split} x[m, k] · W[n, k] for all M (<= BLOCK_M) rows, G·L values a step."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m = tl.arange(0, BLOCK_M)  # [BM]
    row = w_ptr + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    n_ok = n[:, None] < N
    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    if DOT:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out.T: W tile [BN, BK] @ x.T [BK, BM]
        x_rows = x_ptr + m[:, None] * stride_xm  # [BM, 1]
        for k0 in range(k_begin, k_end, G * L):
            acc_t = _gemv_dot_step(acc_t, row, n_ok, x_rows, m[:, None] < M, k0, K, QTYPE, G * L, IEEE)
        out = out_ptr + split * stride_os + m[None, :] * stride_om + n[:, None]
        tl.store(out, acc_t.to(out_ptr.dtype.element_ty), mask=(m[None, :] < M) & (n[:, None] < N))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, G * L):
            q, s, o = _groups(row, n_ok, k0, K, QTYPE, G, L)  # [BN, G, L], [BN, G], [BN, G]
            k = k0 + tl.arange(0, G)[None, :, None] * L + tl.arange(0, L)[None, None, :]
            mm = m[:, None, None]
            x = tl.load(x_ptr + mm * stride_xm + k, mask=(mm < M) & (k < K), other=0.0).to(tl.float32)  # [BM, G, L]
            t = s[None] * tl.sum(x[:, None, :, :] * q[None, :, :, :], axis=3)  # [BM, BN, G]: scale · Σ_l q·x
            if QTYPE == 1 or QTYPE == 2:
                t -= o[None] * tl.sum(x, axis=2)[:, None, :]
            acc += tl.sum(t, axis=2)
        out = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, SPLITS, MN, BLOCK: tl.constexpr):
    """out[i] = Σ_s partial[s, i], s in order (partial fp32 [SPLITS, MN])."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(partial_ptr + s * MN + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, QTYPE: tl.constexpr,
                 G: tl.constexpr, L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr):
    """out[m, n] = x[m, :] · W[n, :] over one BLOCK_M x BLOCK_N tile, G·L values of K a step."""
    # Consecutive programs share one W tile (pid_m fastest): its bytes come from L2 after the first decode.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = w_ptr + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    n_ok = n[:, None] < N
    x_row = x_ptr + m[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, G * L):
        if QTYPE == 1 or QTYPE == 2:
            w_lo, w_hi = _k_halves(row, n_ok, k0, K, QTYPE, G * L // 64)  # [BN, BK / 2] each
            k = k0 + 64 * (tl.arange(0, G * L // 2) // 32) + tl.arange(0, G * L // 2) % 32
            x_mask = (m[:, None] < M) & (k[None, :] < K)
            acc = _dot_acc_x(tl.load(x_row + k[None, :], mask=x_mask, other=0.0), w_lo, acc, IEEE)
            acc = _dot_acc_x(tl.load(x_row + 32 + k[None, :], mask=x_mask, other=0.0), w_hi, acc, IEEE)
        else:
            k = k0 + tl.arange(0, G * L)
            x = tl.load(x_row + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)  # [BM, BK]
            acc = _dot_acc_x(x, _w_tile(row, n_ok, k0, K, QTYPE, G * L), acc, IEEE)
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


# ---- launch configs ----


def _check_block_k(block_k: int) -> None:
    if block_k < 64 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k}: need a power of 2 >= 64 (whole 64-value Q4_K/Q5_K byte runs)")


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiles of a GEMV launch: one program covers ``block_n`` outputs and ``block_k`` inputs per loop step.

    ``kind`` picks the kernel. ``"tile"`` decodes [block_n, block_k] tiles spread over the threads: ``dot``
    multiplies them on the tensor cores in x's dtype (fp16/bf16 x only; the weights are rounded to it), otherwise
    fp32 FMAs on the CUDA cores. ``"rows"`` gives each thread block_n / (32·num_warps) whole rows of W and decodes
    256 values of each a step (``block_k`` 256) into exact fp32 FMAs, with no sum across threads; it needs K a
    multiple of 256. ``programs_per_sm`` sets how far K is split when N gives too few programs (``split_k`` of
    :func:`dequant_matmul` overrides it).
    """

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    dot: bool = False
    num_stages: int = 1
    programs_per_sm: int = 4
    kind: str = "tile"

    def __post_init__(self) -> None:
        _check_block_k(self.block_k)
        if self.block_n < 1 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n={self.block_n}: need a power of 2")
        if self.kind not in ("tile", "rows"):
            raise ValueError(f"kind={self.kind!r}: allowed 'tile', 'rows'")
        if self.kind == "rows" and (self.dot or self.block_k != 256 or self.block_n < 32 * self.num_warps):
            raise ValueError(f"kind='rows' with dot={self.dot}, block_k={self.block_k}, block_n={self.block_n}, "
                             f"num_warps={self.num_warps}: needs dot=False, block_k=256 and whole rows for every "
                             f"thread (block_n >= 32·num_warps)")
        if self.dot and self.block_n < 16:
            raise ValueError(f"block_n={self.block_n}: the tensor-core GEMV needs block_n >= 16")
        if self.programs_per_sm < 1 or self.num_stages < 1 or self.num_warps < 1:
            raise ValueError(f"programs_per_sm={self.programs_per_sm}, num_stages={self.num_stages}, "
                             f"num_warps={self.num_warps}: need >= 1")


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of a GEMM launch: ``block_m`` x ``block_n`` outputs a program, ``block_k`` inputs a step."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        _check_block_k(self.block_k)
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: need a power of 2 >= 16 (tl.dot)")


def gemv_config(qtype: GGMLQuantizationType, M: int, N: int, K: int, x_dtype: torch.dtype) -> GemvConfig:
    """The GEMV tiles for one call's shape: the best of ``scripts/gemv_sweep.py`` on an H100 over R1's shapes
    (bf16 x, M = 1..8: 580-730 GB/s of weight bytes on the large shapes, 320-360 on kv_a/q_a). At M = 1 the rows
    kernel spends fewer instructions per weight: q_b 732 -> 1214 GB/s, q_a 414 -> 720, kv_a 457 -> 481 (H100,
    fifth session; :func:`dequant_matmul` falls back to the tiles where W's rows are not aligned for it)."""
    if x_dtype != torch.float32 and M == 1 and K % 256 == 0:
        return GemvConfig(128, 256, 4, kind="rows")
    return _tile_gemv_config(M, N, x_dtype)


def _tile_gemv_config(M: int, N: int, x_dtype: torch.dtype) -> GemvConfig:
    """The tile kernel's config for one call's shape (see :func:`gemv_config`)."""
    if x_dtype != torch.float32:  # bound by decode instructions per weight: tensor cores at any M
        if N <= 1024:  # kv_a (576 rows): narrower tiles, more of them
            return GemvConfig(32, 128, 4, dot=True)
        return GemvConfig(64, 128, 4, dot=True, programs_per_sm=8 if N >= 4096 else 4)
    # fp32 FMA path: the [M, block_n, block_k] products must fit the registers
    return GemvConfig(16 if M <= 2 else 8, 256 if M <= 4 else 128, 4)


def gemm_config(qtype: GGMLQuantizationType, M: int, N: int, K: int) -> GemmConfig:
    """The GEMM tiles for one call's shape: the best of ``scripts/gemm_sweep.py`` on an H100 over R1's routed
    expert shapes (Q4_K 2048x7168, Q6_K 7168x2048)."""
    if M >= 256:
        return GemmConfig(128, 64, 128, 4, 3)
    if M >= 64:
        return GemmConfig(64, 64, 128, 4, 3)
    return GemmConfig(16, 64, 128, 4, 3)


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


def _interpreted(x: torch.Tensor) -> bool:
    """Triton's CPU interpreter gets bf16/fp16 tl.dot wrong (triton 3.9): the kernels compute in fp32 there."""
    return x.device.type == "cpu"


def _rows_fit(w_raw: torch.Tensor, qtype: GGMLQuantizationType, K: int) -> bool:
    """Whether the rows kernel can read W: whole 256-value steps, uint32 words (Q6_K rows: realigned from 2 bytes)."""
    return K % 256 == 0 and w_raw.data_ptr() % 4 == 0 and w_raw.stride(0) % (2 if qtype == Q.Q6_K else 4) == 0


def _gemv(x: torch.Tensor, w_raw: torch.Tensor, qtype: GGMLQuantizationType, out: torch.Tensor,
          split_k: int | None, cfg: GemvConfig) -> None:
    M, K, N = x.shape[0], x.shape[1], w_raw.shape[0]
    if cfg.dot and x.dtype == torch.float32:
        raise ValueError("GemvConfig(dot=True) needs fp16 or bf16 x (fp32 x keeps fp32 products)")
    if cfg.kind == "rows" and not _rows_fit(w_raw, qtype, K):
        align = 2 if qtype == Q.Q6_K else 4
        raise ValueError(f"GemvConfig(kind='rows') needs K % 256 == 0, w_raw 4-byte aligned and its row stride a "
                         f"multiple of {align}; got K={K}, w_raw at byte {w_raw.data_ptr() % 16} mod 16, row stride "
                         f"{w_raw.stride(0)}")
    L = _GROUP[qtype]
    n_tiles, k_tiles = triton.cdiv(N, cfg.block_n), triton.cdiv(K, cfg.block_k)
    if split_k is None:
        wanted = num_programs_wanted(x.device, cfg.programs_per_sm)
        split_k = triton.cdiv(wanted, n_tiles)
    split_k = max(1, min(split_k, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split_k) * cfg.block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty splits
    partial = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    if cfg.kind == "rows":
        gemv_rows_kernel[(n_tiles, split_k)](
            x, w_raw, partial, N, K, x.stride(0), w_raw.stride(0), M * N, N, k_per_split, 0x4B000000,
            M=M, QTYPE=_QTYPE_ID[qtype], BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        block_m = max(16, triton.next_power_of_2(M)) if cfg.dot else triton.next_power_of_2(M)
        _gemv_kernel[(n_tiles, split_k)](
            x, w_raw, partial, M, N, K, x.stride(0), w_raw.stride(0), M * N, N, k_per_split,
            QTYPE=_QTYPE_ID[qtype], G=cfg.block_k // L, L=L, BLOCK_M=block_m, BLOCK_N=cfg.block_n, DOT=cfg.dot,
            IEEE=_interpreted(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if split_k > 1:  # narrow blocks: a decode-sized M x N still spreads over many programs
        block = 1024 if M * N > (1 << 16) else 128
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](partial, out, split_k, M * N, BLOCK=block)


def dequant_matmul(x: torch.Tensor, w_raw: torch.Tensor, qtype: GGMLQuantizationType, in_features: int,
                   *, split_k: int | None = None, gemv: GemvConfig | None = None,
                   gemm: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32|fp16|bf16 @ W.T, W given as GGUF bytes ``w_raw`` uint8 [N, bytes_per_row] -> [M, N] in x's dtype,
    written into ``out`` (contiguous [M, N] in x's dtype, on x's device) when given.

    M <= ``GEMV_MAX_M`` takes the GEMV kernel: ``split_k`` splits K over that many programs per N tile (by
    default enough to fill the GPU) and ``gemv`` overrides its tiles (default :func:`gemv_config`). Larger M
    takes the GEMM kernel, whose tiles ``gemm`` overrides (default :func:`gemm_config`).
    """
    qtype = GGMLQuantizationType(qtype)
    _check(x, w_raw, qtype, in_features)
    M, K, N = x.shape[0], in_features, w_raw.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)} on {out.device} (contiguous: {out.is_contiguous()}); "
                         f"expected contiguous {x.dtype} [{M}, {N}] on {x.device}")
    if M == 0 or N == 0:
        return out
    if M <= GEMV_MAX_M:
        cfg = gemv or gemv_config(qtype, M, N, K, x.dtype)
        if gemv is None and cfg.kind == "rows" and not _rows_fit(w_raw, qtype, K):
            cfg = _tile_gemv_config(M, N, x.dtype)
        _gemv(x, w_raw, qtype, out, split_k, cfg)
        return out
    cfg = gemm or gemm_config(qtype, M, N, K)
    L = _GROUP[qtype]
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    _gemm_kernel[grid](
        x, w_raw, out, M, N, K, x.stride(0), w_raw.stride(0), out.stride(0), QTYPE=_QTYPE_ID[qtype],
        G=cfg.block_k // L, L=L, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IEEE=x.dtype == torch.float32 or _interpreted(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
