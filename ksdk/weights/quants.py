"""Dequantization of GGUF tensor bytes in torch, vectorized over all quant blocks.

Each decoder works on a ``[n_blocks, type_size]`` uint8 tensor and returns ``[n_blocks, block_size]``
float32 values, computing the products in the same order as ``gguf.quants`` so the results are
bit-identical to that reference. Layouts follow ggml's ``block_*`` structs (all little-endian).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ksdk.errors import UnsupportedQuantError

__all__ = ["SUPPORTED_QTYPES", "block_size", "bytes_per_row", "dequantize", "type_size"]

Q = GGMLQuantizationType
QK_K = 256  # elements per k-quant super-block


def block_size(qtype: GGMLQuantizationType) -> int:
    """Elements per quant block (1 for plain float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per quant block."""
    return GGML_QUANT_SIZES[qtype][1]


def bytes_per_row(qtype: GGMLQuantizationType, row_len: int) -> int:
    """Bytes holding ``row_len`` elements; ``row_len`` must be a whole number of blocks."""
    n_block = block_size(qtype)
    if row_len % n_block != 0:
        raise ValueError(f"row length {row_len} is not a multiple of the {qtype.name} block size {n_block}")
    return row_len // n_block * type_size(qtype)


def _shifts(*values: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian fp16 bytes -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """Bytes [n, groups*width] -> [n, groups, 2, width]: low nibbles of each group, then high nibbles."""
    q = qs.reshape(qs.shape[0], groups, 1, width) >> _shifts(0, 4, device=qs.device).reshape(1, 1, 2, 1)
    return q & 0x0F


def _bits(b: torch.Tensor, count: int, step: int) -> torch.Tensor:
    """Bytes [n, m] -> [n, count, m]: field k is ``(b >> k*step)``, unmasked."""
    shifts = torch.arange(0, count * step, step, dtype=torch.uint8, device=b.device).reshape(1, count, 1)
    return b.unsqueeze(1) >> shifts


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _f16_values(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _bf16_values(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return x * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 1, 16).reshape(n, 32).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 1, 16).reshape(n, 32).to(torch.float32)
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of high bits [n, 4] -> [n, 32]: bit j of the little-endian uint32 is element j's 5th bit."""
    return ((_bits(qh, 8, 1) & 1).permute(0, 2, 1).reshape(qh.shape[0], 32)) << 4


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    low = _nibbles(blocks[:, 6:], 1, 16).reshape(n, 32)
    q = (low | _q5_high(blocks[:, 2:6])).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    low = _nibbles(blocks[:, 8:], 1, 16).reshape(n, 32)
    q = (low | _q5_high(blocks[:, 4:8])).to(torch.float32)
    return d * q + m


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    # element h*128 + t*32 + k sits in byte h*32 + k at bit 2t
    qs = blocks[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=blocks.device).reshape(1, 1, 4, 1)
    q = (qs & 3).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32], qs[64], scales[12] (16 x 6-bit, offset 32), d
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    low = _nibbles(scales[:, :8], 1, 8).reshape(n, 16)
    high = (_bits(scales[:, 8:12], 4, 2) & 3).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=blocks.device).reshape(1, 1, 4, 1)) & 3
    qh = (_bits(hmask, 8, 1) & 1) ^ 1  # a clear hmask bit subtracts 4
    q = ql.reshape(n, 16, 16).to(torch.int8) - (qh.reshape(n, 16, 16) << 2).to(torch.int8)
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins, each [n, 8]."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scaled(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc.to(torch.float32)).reshape(n, 8, 1), (dmin * mn.to(torch.float32)).reshape(n, 8, 1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qs[128]: sub-blocks 2c and 2c+1 share 32 bytes (low, high nibbles)
    n = blocks.shape[0]
    dl, ml = _k_scaled(blocks)
    q = _nibbles(blocks[:, 16:], 4, 32).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qh[32] (bit i: sub-block i), qs[128]
    n = blocks.shape[0]
    dl, ml = _k_scaled(blocks)
    low = _nibbles(blocks[:, 48:], 4, 32).reshape(n, 8, 32)
    high = (_bits(blocks[:, 16:48], 8, 1) & 1) << 4
    q = (low | high).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128], qh[64], scales[16] int8, d
    n = blocks.shape[0]
    d = _f16(blocks[:, 208:210])
    sc = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _nibbles(blocks[:, :128], 2, 64).reshape(n, 8, 32)
    qh = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=blocks.device).reshape(1, 1, 4, 1)) & 3
    q = (ql | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (dl * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)


_DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _f32,
    Q.F16: _f16_values,
    Q.BF16: _bf16_values,
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

SUPPORTED_QTYPES: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)


def _as_uint8_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise TypeError(f"raw bytes must be uint8, got {raw.dtype}")
        return raw.contiguous()
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise TypeError(f"raw bytes must be uint8, got {arr.dtype}")
    # torch cannot wrap a read-only buffer (file memmaps are mapped read-only): copy the packed bytes,
    # which are a fraction of the float32 output's size.
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr)


def dequantize(
    raw: np.ndarray | torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: Sequence[int],
    name: str = "<unnamed>",
) -> torch.Tensor:
    """Decode GGUF bytes ``raw`` of quant type ``qtype`` into a float32 tensor of ``shape`` (torch order), on
    ``raw``'s device (a numpy array: the CPU).

    ``raw`` holds ``prod(shape[:-1])`` rows of ``bytes_per_row(qtype, shape[-1])`` bytes, in any
    layout with that many bytes (for example ``[*shape[:-1], bytes_per_row]``). ``name`` is used in errors.
    """
    qtype = GGMLQuantizationType(qtype)
    decoder = _DECODERS.get(qtype)
    if decoder is None:
        raise UnsupportedQuantError(name, qtype.name, sorted(q.name for q in SUPPORTED_QTYPES))
    shape = tuple(int(s) for s in shape)
    n_rows = prod(shape[:-1])
    expected = n_rows * bytes_per_row(qtype, shape[-1]) if shape else type_size(qtype)
    data = _as_uint8_tensor(raw)
    if data.numel() != expected:
        raise ValueError(
            f"tensor {name!r}: {data.numel()} bytes given, {qtype.name} {list(shape)} needs {expected}"
        )
    blocks = data.reshape(-1, type_size(qtype))
    return decoder(blocks).reshape(shape)
