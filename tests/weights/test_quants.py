"""ksdk.weights.quants: torch dequantization, bit-exact against gguf.quants.dequantize."""

from __future__ import annotations

import time
import zlib

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ksdk.errors import UnsupportedQuantError
from ksdk.weights.quants import SUPPORTED_QTYPES, block_size, bytes_per_row, dequantize, type_size

Q = GGMLQuantizationType
QTYPES = sorted(SUPPORTED_QTYPES, key=lambda q: q.name)


def _reference(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's decoding (its F32 path does not reinterpret bytes, so F32 is a plain view here)."""
    if qtype == Q.F32:
        return raw.view(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # random scale bytes may be inf/NaN
        return gguf.quants.dequantize(raw, qtype)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit equality of float32 arrays (-0.0 differs from 0.0); NaNs must sit in the same places, but
    their payloads may differ (fp16 -> fp32 conversions quiet signaling NaNs differently)."""
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    finite = ~np.isnan(a)
    return np.array_equal(a.view(np.uint32)[finite], b.view(np.uint32)[finite])


def test_supported_qtypes_are_the_listed_ones() -> None:
    names = {q.name for q in SUPPORTED_QTYPES}
    assert names == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} | {
        f"Q{b}_K" for b in range(2, 7)
    }


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("outer", [(1,), (5,), (3, 4), (2, 3, 2)], ids=str)
def test_dequantize_matches_gguf_bit_exactly(qtype: GGMLQuantizationType, outer: tuple[int, ...]) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{qtype.name}{outer}".encode()))
    n_block, n_bytes = GGML_QUANT_SIZES[qtype]
    blocks_per_row = 2 if n_block > 1 else 64
    shape = (*outer, blocks_per_row * n_block)
    raw = rng.integers(0, 256, size=(*outer, blocks_per_row * n_bytes), dtype=np.uint8)

    got = dequantize(raw, qtype, shape)

    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert _same_bits(got.numpy(), _reference(raw, qtype).reshape(shape))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.BF16], ids=lambda q: q.name)
def test_dequantize_accepts_torch_and_readonly_numpy(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(1)
    shape = (4, 512)
    raw = rng.integers(0, 256, size=(4, bytes_per_row(qtype, 512)), dtype=np.uint8)
    expected = dequantize(raw, qtype, shape)
    readonly = raw.copy()
    readonly.flags.writeable = False
    strided = np.zeros((4, raw.shape[1] * 2), dtype=np.uint8)[:, ::2]
    strided[...] = raw

    for variant in (torch.from_numpy(raw.copy()), readonly, strided, raw.reshape(-1)):
        assert torch.equal(dequantize(variant, qtype, shape).view(torch.int32), expected.view(torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_on_the_gpu_gives_the_cpu_bits(qtype: GGMLQuantizationType) -> None:
    """The decoders are device-agnostic torch ops: bytes on the GPU decode there (the embedding's rows do)."""
    rng = np.random.default_rng(zlib.crc32(qtype.name.encode()))
    n_block, n_bytes = GGML_QUANT_SIZES[qtype]
    shape = (7, 4 * n_block if n_block > 1 else 256)
    raw = rng.integers(0, 256, size=(7, bytes_per_row(qtype, shape[1])), dtype=np.uint8)
    got = dequantize(torch.from_numpy(raw).cuda(), qtype, shape)
    assert got.is_cuda
    assert _same_bits(got.cpu().numpy(), dequantize(raw, qtype, shape).numpy())


def test_sizes_come_from_ggml() -> None:
    assert (block_size(Q.Q4_K), type_size(Q.Q4_K)) == (256, 144)
    assert (block_size(Q.Q8_0), type_size(Q.Q8_0)) == (32, 34)
    assert (block_size(Q.F16), type_size(Q.F16)) == (1, 2)
    assert bytes_per_row(Q.Q6_K, 7168) == 28 * 210
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block size 256"):
        bytes_per_row(Q.Q4_K, 100)


def test_unsupported_type_names_tensor_type_and_alternatives() -> None:
    raw = np.zeros((2, 66), dtype=np.uint8)
    with pytest.raises(UnsupportedQuantError, match=r"'blk\.0\.ffn_up_exps\.weight'.*IQ2_XXS.*Q4_K") as info:
        dequantize(raw, Q.IQ2_XXS, (2, 256), name="blk.0.ffn_up_exps.weight")
    assert info.value.tensor == "blk.0.ffn_up_exps.weight" and info.value.qtype == "IQ2_XXS"


def test_wrong_byte_count_is_reported() -> None:
    raw = np.zeros((2, 143), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"'w': 286 bytes given, Q4_K \[2, 256\] needs 288"):
        dequantize(raw, Q.Q4_K, (2, 256), name="w")


def test_q4k_matrix_of_r1_expert_size_is_fast() -> None:
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(2048, bytes_per_row(Q.Q4_K, 7168)), dtype=np.uint8)
    raw[:, :4] = 0x10  # small finite fp16 d/dmin
    dequantize(raw[:8], Q.Q4_K, (8, 7168))  # warm up
    start = time.perf_counter()
    out = dequantize(raw, Q.Q4_K, (2048, 7168))
    elapsed = time.perf_counter() - start
    assert out.shape == (2048, 7168)
    assert elapsed < 1.0, f"2048x7168 Q4_K took {elapsed:.2f} s"  # ~0.15 s here; slack for the shared CPU
