"""The "rows" decode GEMV: out = x @ W.T for a few rows of x, W in its GGUF blocks, each thread owning whole rows of W.

The tile kernels of ``ksdk.kernels.dequant_matmul`` spread a [block_n, block_k] tile over a program's threads,
decode it and reduce across threads; at one token that costs 8-18 instructions a weight, and decode speed is set
by instructions, not bytes. Here each thread owns whole rows n of W and walks K 256 values at a time (8
Q8_0/Q5_0 blocks or one K-quant block a step), read as 16-byte pieces of uint32 words, so every field of a block
sits at a byte and bit known at compile time; no sum crosses threads. Integer fields become exact fp32 values
without conversion instructions (see the row decoders below), so a weight costs about 4-6 instructions at M = 1.

Selected by ``GemvConfig(kind="rows")`` and launched by ``dequant_matmul``, which checks what it needs: K a
multiple of 256 and W's rows 4-byte aligned (2 for Q6_K, whose 210-byte blocks are realigned in registers).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["gemv_rows_kernel"]


# ---- row decoders for the "rows" GEMV: each thread owns whole rows of W, 256 values of each a step ----
#
# A row's 256 values (8 Q8_0/Q5_0 blocks, one K-quant block) arrive as a tuple of uint32 [BN] words, so every
# field sits at a static byte and bit. Integer fields become fp32 without a conversion instruction: OR'ed onto the
# bits of 2^23 (``magic``, a runtime value held in a register so that the field mask is the one immediate of a
# single LOP3) a field f at bit P < 23 reads as 2^23 + f·2^P, and one FFMA scales and offsets that to f - offset
# exactly. Each helper returns fp32 [BN]. A field's place P is its bit in word o // 4, or in that word shifted down
# 16 bits when it would reach bit 23; each decoder works P out itself as a constexpr expression, since a
# @triton.jit helper's result is a tensor, not a constexpr (Triton 3.6), and ``2.0 ** -P`` needs a constexpr.


@triton.jit
def _placed_word(words, o: tl.constexpr, P: tl.constexpr):
    """The word holding byte ``o`` of ``words``, shifted down 16 bits when the field's place P is below its byte."""
    w = words[o // 4]
    if P < 8 * (o % 4):
        w = w >> 16
    return w


@triton.jit
def _magic(words, o: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, magic):
    """2^23 + f·2^P exactly, f the BITS-bit field of byte ``o`` of ``words`` that sits at place P."""
    field = _placed_word(words, o, P) & (((1 << BITS) - 1) << P)
    return (field | magic).to(tl.float32, bitcast=True)


@triton.jit
def _uint_at(words, o: tl.constexpr, BIT: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr, magic):
    """The BITS-bit field at bit BIT of byte ``o`` (BIT + BITS <= 8), minus OFFSET."""
    P: tl.constexpr = 8 * (o % 4) + BIT - 16 * (8 * (o % 4) + BIT + BITS > 23)
    return tl.fma(_magic(words, o, P, BITS, magic), 2.0 ** -P, -(2.0 ** (23 - P) + OFFSET))


@triton.jit
def _uint_hl_at(words, o_lo: tl.constexpr, BIT_LO: tl.constexpr, o_hi: tl.constexpr, BIT_HI: tl.constexpr,
                HBITS: tl.constexpr, OFFSET: tl.constexpr, magic):
    """(the nibble at bit BIT_LO of byte ``o_lo``) + 16·(the HBITS-bit field at bit BIT_HI of byte ``o_hi``) -
    OFFSET, in two FFMAs, each exact: every constant is a sum of powers of 2 spanning at most 24 bits."""
    P: tl.constexpr = 8 * (o_lo % 4) + BIT_LO - 16 * (8 * (o_lo % 4) + BIT_LO + 4 > 23)
    E: tl.constexpr = 8 * (o_hi % 4) + BIT_HI - 16 * (8 * (o_hi % 4) + BIT_HI + HBITS > 23)
    high = _magic(words, o_hi, E, HBITS, magic)  # 2^23 + h·2^E
    t = tl.fma(high, 2.0 ** (4 - E), -(2.0 ** (23 - P) + 2.0 ** (27 - E) + OFFSET))  # 16h - 2^(23 - P) - OFFSET
    return tl.fma(_magic(words, o_lo, P, 4, magic), 2.0 ** -P, t)


@triton.jit
def _int8_at(words, o: tl.constexpr, magic):
    """The int8 at byte ``o``: with its sign bit flipped it reads as q + 128."""
    P: tl.constexpr = 8 * (o % 4) - 16 * (o % 4 >= 2)
    f = ((_placed_word(words, o, P) & (0xFF << P)) ^ (magic | (0x80 << P))).to(tl.float32, bitcast=True)
    return tl.fma(f, 2.0 ** -P, -(2.0 ** (23 - P) + 128))


@triton.jit
def _f16_of(words, o: tl.constexpr):
    """The f16 at byte ``o`` (even), as fp32."""
    w = words[o // 4]
    if o % 4 == 2:
        w = w >> 16
    return (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u32_at(words, o: tl.constexpr):
    """The 4 bytes from byte ``o`` (even) of ``words``, as one uint32."""
    if o % 4 == 0:
        w = words[o // 4]
    else:
        w = (words[o // 4] >> 16) | (words[o // 4 + 1] << 16)
    return w


@triton.jit
def _shifted(w, s: tl.constexpr):
    """``w`` shifted left by s bits, right when s < 0."""
    if s >= 0:
        r = w << s
    else:
        r = w >> -s
    return r


@triton.jit
def _bits_to_bytes(v):
    """Bits 0..3 of ``v`` at bit 4 of bytes 0..3: the multiply puts bit k at k + 7i + 4 for i = 0..3, all distinct."""
    return ((v & 0xF) * 0x02040810) & 0x10101010


@triton.jit
def _byte_values(w, BITS: tl.constexpr, OFFSET: tl.constexpr, magic):
    """The low BITS bits of each byte of ``w``, minus OFFSET: a tuple of 4."""
    ws = (w,)
    return (_uint_at(ws, 0, 0, BITS, OFFSET, magic), _uint_at(ws, 1, 0, BITS, OFFSET, magic),
            _uint_at(ws, 2, 0, BITS, OFFSET, magic), _uint_at(ws, 3, 0, BITS, OFFSET, magic))


@triton.jit
def _words16(ptr, PIECES: tl.constexpr):
    """The 4·PIECES uint32 words at ``ptr`` [BN] (16-byte aligned), one 16-byte load a piece: a tuple of [BN]."""
    p = ptr.to(tl.pointer_type(tl.uint32))[:, None] + tl.arange(0, 4)[None, :]
    words = ()
    for i in tl.static_range(PIECES):
        even, odd = tl.split(tl.reshape(tl.load(p + 4 * i), (p.shape[0], 2, 2)))  # words 4i + {0, 2}, 4i + {1, 3}
        w0, w2 = tl.split(even)
        w1, w3 = tl.split(odd)
        words = words + (w0, w1, w2, w3)
    return words


@triton.jit
def _x16(ptr):
    """The 16 bytes of x at scalar ``ptr``: a tuple of 4 (fp32) or 8 (fp16, bf16) fp32 scalars, every thread
    holding all."""
    if ptr.dtype.element_ty == tl.float32:
        x0, x2, x1, x3 = _split4(tl.load(ptr + tl.arange(0, 4)))
        xs = (x0, x1, x2, x3)
    else:
        v = tl.load(ptr + tl.arange(0, 8))
        if ptr.dtype.element_ty == tl.bfloat16:  # bf16 -> fp32 is its bits moved up: one instruction, not two
            v = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            v = v.to(tl.float32)
        even, odd = tl.split(tl.reshape(v, (4, 2)))
        x0, x4, x2, x6 = _split4(even)
        x1, x5, x3, x7 = _split4(odd)
        xs = (x0, x1, x2, x3, x4, x5, x6, x7)
    return xs


@triton.jit
def _split4(v):
    """The 4 values of ``v`` [4] in the order 0, 2, 1, 3."""
    a, b = tl.split(tl.reshape(v, (2, 2)))
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v2, v1, v3


@triton.jit
def _zeros_like(acc):
    """A tuple of zeros shaped as the tuple ``acc``."""
    zeros = ()
    for m in tl.static_range(len(acc)):
        zeros = zeros + (tl.zeros(acc[m].shape, dtype=tl.float32),)
    return zeros


@triton.jit
def _add_dot(acc, qs, x_steps, k: tl.constexpr, scale):
    """For every row m of x: acc[m] + scale·Σ_i qs[i]·x[m, k0 + k + i], as a new tuple (see :func:`_add_dots`)."""
    return _add_dots(acc, acc, qs, x_steps, k, scale, 0.0)[0]


@triton.jit
def _add_dots(by_q, by_x, qs, x_steps, k: tl.constexpr, q_scale, x_scale):
    """For every row m of x: by_q[m] + q_scale·Σ_i qs[i]·x[m, k0 + k + i] and by_x[m] + x_scale·Σ_i x[m, k0 + k + i],
    as two new tuples (``qs``: a tuple of [BN], decoded once for all rows; ``x_steps``: the rows' pointers at k0)."""
    PER: tl.constexpr = 128 // x_steps[0].dtype.element_ty.primitive_bitwidth  # x values a 16-byte load
    new_q = ()
    new_x = ()
    for m in tl.static_range(len(x_steps)):
        dot = tl.zeros(qs[0].shape, dtype=tl.float32)
        x_sum = 0.0
        for c in tl.static_range(len(qs) // PER):
            xs = _x16(x_steps[m] + k + c * PER)
            for i in tl.static_range(PER):
                dot += qs[c * PER + i] * xs[i]
                x_sum += xs[i]
        new_q = new_q + (by_q[m] + q_scale * dot,)
        new_x = new_x + (by_x[m] + x_scale * x_sum,)
    return new_q, new_x


@triton.jit
def _k_scale_min_of(w, j: tl.constexpr, magic):
    """Sub-block j's 6-bit scale and min from the 12 bytes at byte 4 of ``w`` (Q4_K, Q5_K), as in _k_scale_min."""
    if j < 4:
        sc = _uint_at(w, 4 + j, 0, 6, 0, magic)
        mn = _uint_at(w, 8 + j, 0, 6, 0, magic)
    else:  # low nibble of byte j + 4 | top 2 bits of byte j - 4; high nibble of byte j + 4 | top 2 bits of byte j
        sc = _uint_hl_at(w, 8 + j, 0, j, 6, 2, 0, magic)
        mn = _uint_hl_at(w, 8 + j, 4, 4 + j, 6, 2, 0, magic)
    return sc, mn


@triton.jit
def _q8_0_rows(acc, w, x_steps, magic):
    # 8 blocks of 34 bytes: d f16, qs int8[32]
    for blk in tl.static_range(8):
        qs = ()
        for i in tl.static_range(32):
            qs = qs + (_int8_at(w, 34 * blk + 2 + i, magic),)
        acc = _add_dot(acc, qs, x_steps, 32 * blk, _f16_of(w, 34 * blk))
    return acc


@triton.jit
def _q5_0_rows(acc, w, x_steps, magic):
    # 8 blocks of 22 bytes: d f16, qh u32 (bit e: element e's 5th bit), qs[16] (element e < 16: the low nibble of
    # qs[e], else the high nibble of qs[e - 16]); values q - 16. Four 5-bit values are put together in the bytes
    # of one word before they become floats.
    for blk in tl.static_range(8):
        qh = _u32_at(w, 22 * blk + 2)
        lo = ()  # elements 0..15
        hi = ()  # elements 16..31
        for j in tl.static_range(4):  # qs[4j : 4j + 4]
            qs = _u32_at(w, 22 * blk + 6 + 4 * j)
            lo = lo + _byte_values((qs & 0x0F0F0F0F) | _bits_to_bytes(qh >> (4 * j)), 5, 16, magic)
            hi = hi + _byte_values(((qs >> 4) & 0x0F0F0F0F) | _bits_to_bytes(qh >> (16 + 4 * j)), 5, 16, magic)
        acc = _add_dot(acc, lo + hi, x_steps, 32 * blk, _f16_of(w, 22 * blk))
    return acc


@triton.jit
def _k_quant_rows(acc, w, x_steps, QTYPE: tl.constexpr, magic):
    # Q4_K, 144 bytes: d, dmin, scales[12], qs[128]; Q5_K, 176 bytes: the same with qh[32] before qs (bit j of
    # qh[l]: sub-block j's 5th bit). Sub-blocks 2c, 2c + 1 are the low and high nibbles of qs[32c : 32c + 32].
    # Σ (d·sc·q - dmin·mn)·x = d·Σ_j sc_j·(Σ q·x) - dmin·Σ_j mn_j·(Σ x)
    QS: tl.constexpr = 16 + 32 * (QTYPE - 1)  # qs's byte offset
    by_scale = _zeros_like(acc)  # Σ_j sc_j · Σ q·x, per row of x
    by_min = _zeros_like(acc)  # Σ_j mn_j · Σ x
    for j in tl.static_range(8):
        qs = ()
        if QTYPE == 1:
            for l in tl.static_range(32):
                qs = qs + (_uint_at(w, QS + 32 * (j // 2) + l, 4 * (j % 2), 4, 0, magic),)
        else:  # four 5-bit values put together in the bytes of one word
            for l4 in tl.static_range(8):
                low = (w[(QS + 32 * (j // 2)) // 4 + l4] >> (4 * (j % 2))) & 0x0F0F0F0F
                qs = qs + _byte_values(low | (_shifted(w[4 + l4], 4 - j) & 0x10101010), 5, 0, magic)
        sc, mn = _k_scale_min_of(w, j, magic)
        by_scale, by_min = _add_dots(by_scale, by_min, qs, x_steps, 32 * j, sc, mn)
    d, dmin = _f16_of(w, 0), _f16_of(w, 2)
    new = ()
    for m in tl.static_range(len(acc)):
        new = new + (acc[m] + d * by_scale[m] - dmin * by_min[m],)
    return new


@triton.jit
def _q6_k_rows(acc, w, d, x_steps, magic):
    # ql[128], qh[64], scales[16] int8 (d apart): value e = 128h + 32t + l is nibble t // 2 of ql[64h + 32(t % 2) +
    # l] and bits 2t of qh[32h + l], minus 32, with scale e // 16
    by_scale = _zeros_like(acc)  # Σ_g scale_g · Σ q·x, per row of x
    for g in tl.static_range(16):  # values 16g + i = 128h + 32t + l: h = g // 8, t = g // 2 % 4, l = 16(g % 2) + i
        qs = ()
        for l4 in tl.static_range(4):  # four 6-bit values put together in the bytes of one word
            ql = w[(64 * (g // 8) + 32 * (g // 2 % 2) + 16 * (g % 2)) // 4 + l4] >> (4 * (g // 4 % 2))
            qh = _shifted(w[(128 + 32 * (g // 8) + 16 * (g % 2)) // 4 + l4], 4 - 2 * (g // 2 % 4))
            qs = qs + _byte_values((ql & 0x0F0F0F0F) | (qh & 0x30303030), 6, 32, magic)
        by_scale = _add_dot(by_scale, qs, x_steps, 16 * g, _int8_at(w, 192 + g, magic))
    new = ()
    for m in tl.static_range(len(acc)):
        new = new + (acc[m] + d * by_scale[m],)
    return new


@triton.jit
def _q6_k_words(ptr, off):
    """Bytes 0..207 of the Q6_K blocks at ``ptr`` [BN] (2-byte aligned, ``off`` [BN] their byte offsets from a
    4-byte aligned address) as 52 uint32 words: read from the aligned address below, shifted into place."""
    shift = (off % 4).to(tl.uint64) * 8  # 0 or 16
    raw = (ptr - off % 4).to(tl.pointer_type(tl.uint32))
    words = ()
    lo = tl.load(raw)
    for i in tl.static_range(52):
        if i < 51:
            hi = tl.load(raw + i + 1)
        else:  # word 52 lies past the block unless shifted: then read word 51 again
            hi = tl.load(raw + 51 + (shift > 0).to(tl.int32))
        words = words + (((hi.to(tl.uint64) << 32 | lo.to(tl.uint64)) >> shift).to(tl.uint32),)
        lo = hi
    return words


# ---- the kernel ----


@triton.jit
def gemv_rows_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_os, stride_om, K_PER_SPLIT, magic,
                      M: tl.constexpr, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[split, m, n] = Σ_{k in this split} x[m, k] · W[n, k] for the M rows of x, each thread owning whole rows n
    of W (no sum crosses threads), 256 values of K a step. ``magic``: 0x4B000000, see the row decoders."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_off = tl.minimum(n, N - 1).to(tl.int64) * stride_wn  # [BN] bytes; rows past N read row N - 1, unstored
    acc = ()  # out[split, m, n] for each m
    for m in tl.static_range(M):
        acc = acc + (tl.zeros((BLOCK_N,), dtype=tl.float32),)
    k_begin = split * K_PER_SPLIT
    for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), 256):
        x_steps = ()
        for m in tl.static_range(M):
            x_steps = x_steps + (x_ptr + m * stride_xm + k0,)
        if QTYPE == 0:
            acc = _q8_0_rows(acc, _words16(w_ptr + row_off + (k0 // 256) * 272, 17), x_steps, magic)
        elif QTYPE == 1 or QTYPE == 2:
            w = _words16(w_ptr + row_off + (k0 // 256) * (144 + 32 * (QTYPE - 1)), 9 + 2 * (QTYPE - 1))
            acc = _k_quant_rows(acc, w, x_steps, QTYPE, magic)
        elif QTYPE == 3:
            off = row_off + (k0 // 256) * 210
            d = tl.load((w_ptr + off + 208).to(tl.pointer_type(tl.uint16))).to(tl.float16, bitcast=True)
            acc = _q6_k_rows(acc, _q6_k_words(w_ptr + off, off), d.to(tl.float32), x_steps, magic)
        else:
            acc = _q5_0_rows(acc, _words16(w_ptr + row_off + (k0 // 256) * 176, 11), x_steps, magic)
    for m in tl.static_range(M):
        tl.store(out_ptr + split * stride_os + m * stride_om + n, acc[m].to(out_ptr.dtype.element_ty), mask=n < N)
