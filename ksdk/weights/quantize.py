"""Quantization of float32 arrays into GGUF block bytes (numpy, vectorized over blocks).

Used to write test models and benchmark inputs, not on the serving path. The legacy types
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and the float types reproduce ggml's reference rounding bit for bit;
the k-quants use simple min/max (or absmax) scales: valid blocks with modest error, not ggml's
error-minimizing search.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf.constants import GGMLQuantizationType

from ksdk.errors import UnsupportedQuantError
from ksdk.weights.quants import QK_K, block_size, bytes_per_row, type_size

__all__ = ["QUANTIZABLE_QTYPES", "quantize"]

Q = GGMLQuantizationType
F32 = np.float32


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[n, 1] float32 -> [n, 2] fp16 bytes."""
    return x.astype(np.float16).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, with 0 where d == 0 (an all-zero block quantizes to zeros)."""
    safe = np.where(d == 0, F32(1), d)
    return np.where(d == 0, F32(0), F32(1) / safe).astype(F32)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero (numpy's rint rounds them to even).

    Adding 0.5 before flooring would misround values just below a half (the sum rounds up in float32),
    so the fraction is doubled instead, which is exact."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(F32(2) * (a - whole)), x)


def _pack_nibbles(q: np.ndarray, width: int) -> np.ndarray:
    """[n, groups*2*width] 4-bit values -> [n, groups*width] bytes: within each group, the first
    ``width`` values go to the low nibbles and the next ``width`` to the high nibbles."""
    n = q.shape[0]
    g = q.reshape(n, -1, 2, width)
    return ((g[:, :, 0] & 0x0F) | (g[:, :, 1] << 4)).reshape(n, -1).astype(np.uint8)


def _pack_bits(q: np.ndarray, count: int, step: int) -> np.ndarray:
    """[n, count, m] values of ``step`` bits -> [n, m] bytes with field k at bit k*step."""
    shifts = np.arange(0, count * step, step, dtype=np.uint8).reshape(1, count, 1)
    return np.bitwise_or.reduce(q.astype(np.uint8) << shifts, axis=1).astype(np.uint8)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude per block, keeping its sign (first one on ties), [n, 1]."""
    i = np.abs(blocks).argmax(axis=-1, keepdims=True)
    return np.take_along_axis(blocks, i, axis=-1)


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32)
    # NaNs become quiet NaNs (rounding could carry them into inf); others round to nearest even
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = np.where(nan, (bits >> 16) | 0x40, rounded)
    return out.astype(np.uint16).view(np.uint8)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = np.abs(blocks).max(axis=-1, keepdims=True) / F32(127)
    q = _round_half_away(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=-1)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _signed_absmax(blocks) / F32(-8)
    q = np.clip(np.trunc(blocks * _inverse(d) + F32(8.5)), 0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q, 16)], axis=-1)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    d = (hi - lo) / F32(15)
    q = np.clip(np.trunc((blocks - lo) * _inverse(d) + F32(0.5)), 0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q, 16)], axis=-1)


def _q5_high(q: np.ndarray) -> np.ndarray:
    """Fifth bits of [n, 32] values -> [n, 4] bytes, element j at bit j of a little-endian uint32."""
    return _pack_bits((q >> 4).reshape(-1, 4, 8).transpose(0, 2, 1), 8, 1)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _signed_absmax(blocks) / F32(-16)
    q = np.clip(np.trunc(blocks * _inverse(d) + F32(16.5)), 0, 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _q5_high(q), _pack_nibbles(q, 16)], axis=-1)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    d = (hi - lo) / F32(31)
    q = np.clip(np.trunc((blocks - lo) * _inverse(d) + F32(0.5)), 0, 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _q5_high(q), _pack_nibbles(q, 16)], axis=-1)


def _super_scale(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize per-sub-block scales [n, s] >= 0 to integers 0..levels under one fp16 super-scale.

    Returns the integer scales [n, s] and the fp16-rounded super-scale [n, 1]."""
    d = (values.max(axis=-1, keepdims=True) / F32(levels)).astype(np.float16).astype(F32)
    q = np.clip(_round_half_away(values * _inverse(d)), 0, levels).astype(np.uint8)
    return q, d


def _asymmetric_k(blocks: np.ndarray, sub: int, levels: int) -> tuple[np.ndarray, ...]:
    """Min/max quantization shared by Q2_K, Q4_K and Q5_K: x ~ d*sc*q - dmin*m, q in 0..levels.

    Returns (q [n, 256], scales [n, s], mins [n, s], d [n, 1], dmin [n, 1]) for s sub-blocks of ``sub``."""
    n = blocks.shape[0]
    x = blocks.reshape(n, -1, sub)
    lo = np.minimum(x.min(axis=-1), F32(0))  # mins are stored as non-negative offsets
    hi = x.max(axis=-1)
    scale_levels = 15 if sub == 16 else 63
    sc, d = _super_scale((hi - lo) / F32(levels), scale_levels)
    mn, dmin = _super_scale(-lo, scale_levels)
    step = (d * sc.astype(F32))[..., None]  # [n, s, 1]
    offset = (dmin * mn.astype(F32))[..., None]
    q = np.clip(_round_half_away((x + offset) * _inverse(step)), 0, levels).astype(np.uint8)
    return q.reshape(n, QK_K), sc, mn, d, dmin


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] -> the 12-byte layout of Q4_K/Q5_K."""
    lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
    lo_mn, hi_mn = mn[:, :4], mn[:, 4:]
    first = lo_sc | ((hi_sc >> 4) << 6)
    second = lo_mn | ((hi_mn >> 4) << 6)
    third = (hi_sc & 0x0F) | ((hi_mn & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=-1).astype(np.uint8)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, mn, d, dmin = _asymmetric_k(blocks, 16, 3)
    # element h*128 + t*32 + k goes to byte h*32 + k at bit 2t
    qs = _pack_bits(q.reshape(n, 2, 4, 32).reshape(n * 2, 4, 32), 4, 2).reshape(n, 64)
    return np.concatenate([sc | (mn << 4), qs, _f16_bytes(d), _f16_bytes(dmin)], axis=-1)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, mn, d, dmin = _asymmetric_k(blocks, 32, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), _pack_nibbles(q, 32)], axis=-1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, mn, d, dmin = _asymmetric_k(blocks, 32, 31)
    qh = _pack_bits((q >> 4).reshape(n, 8, 32), 8, 1)  # bit i of byte k: sub-block i, element k
    low = _pack_nibbles(q & 0x0F, 32)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qh, low], axis=-1)


def _symmetric_k(blocks: np.ndarray, q_max: int, scale_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absmax quantization over 16 sub-blocks of 16: x ~ d*sc*q, |q| <= q_max, 0 <= sc <= scale_max.

    Returns (q [n, 256] signed, sc [n, 16], d [n, 1])."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    sc, d = _super_scale(np.abs(x).max(axis=-1) / F32(q_max), scale_max)
    step = (d * sc.astype(F32))[..., None]
    q = np.clip(_round_half_away(x * _inverse(step)), -q_max, q_max).astype(np.int8)
    return q.reshape(n, QK_K), sc, d


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, d = _symmetric_k(blocks, 3, 31)
    u = (q + 4).astype(np.uint8)  # 0..7: low two bits in qs, the third in hmask
    hmask = _pack_bits((u >> 2).reshape(n, 8, 32), 8, 1)
    qs = _pack_bits((u & 3).reshape(n * 2, 4, 32), 4, 2).reshape(n, 64)
    s = sc + 32  # 6-bit scales with offset 32: low nibble in byte i%8 (nibble i//8), high bits in byte 8 + i%4
    low = _pack_nibbles(s & 0x0F, 8)
    high = _pack_bits((s >> 4).reshape(n, 4, 4), 4, 2)
    return np.concatenate([hmask, qs, low, high, _f16_bytes(d)], axis=-1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    q, sc, d = _symmetric_k(blocks, 31, 127)
    u = (q + 32).astype(np.uint8).reshape(n * 2, 128)  # two halves of 128 elements
    ql = _pack_nibbles(u & 0x0F, 64).reshape(n, 128)
    qh = _pack_bits((u >> 4).reshape(n * 2, 4, 32), 4, 2).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=-1)


_ENCODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: lambda x: x.view(np.uint8),
    Q.F16: lambda x: x.astype(np.float16).view(np.uint8),
    Q.BF16: _bf16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}

QUANTIZABLE_QTYPES: frozenset[GGMLQuantizationType] = frozenset(_ENCODERS)


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, name: str = "<unnamed>") -> np.ndarray:
    """Encode float values ``x`` [..., n] as ``qtype`` blocks: uint8 [..., bytes_per_row(qtype, n)].

    ``n`` must be a multiple of the type's block size. ``name`` is used in errors."""
    qtype = GGMLQuantizationType(qtype)
    encoder = _ENCODERS.get(qtype)
    if encoder is None:
        raise UnsupportedQuantError(name, qtype.name, sorted(q.name for q in QUANTIZABLE_QTYPES))
    values = np.ascontiguousarray(x, dtype=F32)
    if values.ndim == 0:
        raise ValueError(f"tensor {name!r}: cannot quantize a scalar")
    row_bytes = bytes_per_row(qtype, values.shape[-1])
    blocks = values.reshape(-1, block_size(qtype))
    out = encoder(blocks)
    assert out.dtype == np.uint8 and out.size == blocks.shape[0] * type_size(qtype)
    return out.reshape(*values.shape[:-1], row_bytes)
