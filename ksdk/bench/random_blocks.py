"""Random but valid GGUF expert tensors, made in memory (for the benchmark and the tests).

Quantized blocks are random bytes with their f16 scale fields set to small positive values, so every
block decodes to finite weights of roughly the asked magnitude. Q4_K/Q5_K sub-blocks get min = scale
and dmin = d times the mid quant value, so their weights are centred on zero like trained ones (random
mins would give every row the same large mean, an output that real layers never have).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

__all__ = ["RandomExpertTensor", "random_expert_tensor"]

Q = gguf.GGMLQuantizationType

# Byte offsets of the f16 scale fields in one block, and the divisor that maps `scale` to d such that the
# decoded weights have roughly that magnitude (quant value times sub-block scale is about the divisor).
_SCALE_FIELDS: dict[Q, tuple[tuple[int, ...], float]] = {
    Q.Q4_K: ((0,), 150.0),
    Q.Q5_K: ((0,), 300.0),
    Q.Q6_K: ((208,), 1024.0),
    Q.Q8_0: ((0,), 64.0),
}


# Random bytes are drawn once into a pool this big and copied from random offsets: an R1 layer (7.3 GB)
# is made in seconds, and tensors up to this size (every test) are fully random.
_POOL_BYTES = 64 << 20


def _fill_random(out: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> None:
    start, done = int(rng.integers(pool.size)), 0
    while done < out.size:
        n = min(pool.size - start, out.size - done)
        out[done : done + n] = pool[start : start + n]
        done, start = done + n, 0


_MID_QUANT = {Q.Q4_K: 7.5, Q.Q5_K: 15.5}


def _centre_kquant(blocks: np.ndarray, mid: float) -> None:
    """Make each Q4_K/Q5_K sub-block's 6-bit min equal its scale, and dmin = d * mid: zero-mean weights."""
    scales = blocks[:, 4:16]
    scales[:, 4:8] = scales[:, 0:4]  # low 6 bits: min_j = scale_j (j < 4); top 2 bits: the same for j >= 4
    scales[:, 8:12] = (scales[:, 8:12] & 0xF) * 0x11  # j >= 4: low nibble of the min = that of the scale
    d = blocks[:, 0:2].copy().view(np.float16)
    blocks[:, 2:4] = (d.astype(np.float32) * mid).astype(np.float16).view(np.uint8)


@dataclass(frozen=True)
class RandomExpertTensor:
    """A stand-in for a GGUF tensor view: the fields ``CPUExperts`` reads."""

    qtype: Q
    shape: tuple[int, int, int]  # (n_expert, out_features, in_features)
    raw: np.ndarray  # uint8 (n_expert, out_features, bytes_per_row)


def random_expert_tensor(
    qtype: Q, n_expert: int, rows: int, cols: int, *, seed: int = 0, scale: float = 0.02
) -> RandomExpertTensor:
    """(n_expert, rows, cols) expert weights in ``qtype`` blocks with weights of magnitude about ``scale``."""
    rng = np.random.default_rng(seed)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block_values:
        raise ValueError(f"cols={cols} is not a multiple of {qtype.name}'s block of {block_values}")
    row_bytes = cols // block_values * block_bytes
    raw = np.empty((n_expert, rows, row_bytes), dtype=np.uint8)
    pool = np.frombuffer(rng.bytes(min(raw.size, _POOL_BYTES)), dtype=np.uint8)
    for e in range(n_expert):  # one expert at a time bounds the temporary memory
        if qtype in (Q.F16, Q.BF16):
            values = rng.standard_normal((rows, cols), dtype=np.float32) * scale
            if qtype == Q.F16:
                raw[e] = values.astype(np.float16).view(np.uint8)
            else:
                raw[e] = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
            continue
        offsets, divisor = _SCALE_FIELDS[qtype]
        blocks = raw[e].reshape(-1, block_bytes)
        _fill_random(blocks.reshape(-1), pool, rng)
        for offset in offsets:
            d = (rng.uniform(0.5, 1.0, blocks.shape[0]) * scale / divisor).astype(np.float16)
            blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)
        if qtype in _MID_QUANT:
            _centre_kquant(blocks, _MID_QUANT[qtype])
    return RandomExpertTensor(qtype, (n_expert, rows, cols), raw)
