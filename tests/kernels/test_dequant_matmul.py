"""dequant_matmul against its torch reference, for every kernel quant type, on both the GEMV and GEMM paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from ksdk.kernels.dequant_matmul import (
    GEMV_MAX_M,
    KERNEL_QTYPES,
    GemmConfig,
    GemvConfig,
    dequant_matmul,
    dequant_matmul_reference,
    gemv_config,
)
from ksdk.weights.quantize import quantize
from ksdk.weights.quants import bytes_per_row

# Offsets of each block's f16 scale fields: random bytes there could decode to inf or nan.
_F16_FIELDS = {Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
_BLOCK_BYTES = {Q.Q8_0: 34, Q.Q5_0: 22, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def random_rows(qtype: Q, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """[rows, bytes_per_row] uint8: random bytes (every bit pattern of quants and packed scales) with sane f16 scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, bytes_per_row(qtype, cols)), dtype=np.uint8)
    blocks = raw.reshape(-1, _BLOCK_BYTES[qtype])
    for offset in _F16_FIELDS[qtype]:
        d = rng.uniform(-1e-2, 1e-2, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw)


def quantized_rows(qtype: Q, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """[rows, bytes_per_row] uint8 from our quantizer on normal weights: the blocks real files hold."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return torch.from_numpy(quantize(w, qtype).reshape(rows, -1))


# (M, N, K): M <= GEMV_MAX_M takes the GEMV kernel, above the GEMM kernel; N and M not tile multiples.
SHAPES = [(1, 48, 512), (3, 32, 256), (GEMV_MAX_M + 9, 80, 256)]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to max |y|


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err} vs max |y| {scale}"


@pytest.mark.parametrize("qtype", KERNEL_QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_blocks_fp32(qtype: Q, shape: tuple[int, int, int], device: torch.device) -> None:
    M, N, K = shape
    w = random_rows(qtype, N, K, seed=M).to(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(device)
    _close(dequant_matmul(x, w, qtype, K), dequant_matmul_reference(x, w, qtype, K), torch.float32)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 2, GEMV_MAX_M + 1])
def test_quantized_weights_half_activations(qtype: Q, dtype: torch.dtype, M: int, device: torch.device) -> None:
    N, K = 40, 256
    w = quantized_rows(qtype, N, K).to(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(device, dtype)
    y = dequant_matmul(x, w, qtype, K)
    assert y.dtype == dtype and y.shape == (M, N)
    _close(y, dequant_matmul_reference(x, w, qtype, K), dtype)


def test_split_k_equals_one_split(device: torch.device) -> None:
    M, N, K = 2, 32, 1024
    w = random_rows(Q.Q4_K, N, K).to(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(0)).to(device)
    whole = dequant_matmul(x, w, Q.Q4_K, K, split_k=1)
    torch.testing.assert_close(dequant_matmul(x, w, Q.Q4_K, K, split_k=3), whole, rtol=1e-5, atol=1e-5)
    _close(whole, dequant_matmul_reference(x, w, Q.Q4_K, K), torch.float32)


# K = 800 leaves a partial step for the 32-value block types and 3 splits cut K off step bounds; N = 37 a
# partial N tile. Every tile shape must compute the same function.
GEMV_CONFIGS = [GemvConfig(4, 64, 4), GemvConfig(32, 256, 4), GemvConfig(16, 128, 4, dot=True),
                GemvConfig(32, 64, 4, dot=True)]


@pytest.mark.parametrize("qtype", KERNEL_QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("cfg", GEMV_CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}{'dot' if c.dot else ''}")
def test_gemv_tiles_and_splits(qtype: Q, cfg: GemvConfig, device: torch.device) -> None:
    M, N = 3, 37
    K = 512 if _BLOCK_BYTES[qtype] > 34 else 800
    w = quantized_rows(qtype, N, K, seed=cfg.block_n).to(device)
    dtype = torch.bfloat16 if cfg.dot else torch.float32
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(cfg.block_k)).to(device, dtype)
    ref = dequant_matmul_reference(x, w, qtype, K)
    for split_k in (1, 3):
        _close(dequant_matmul(x, w, qtype, K, split_k=split_k, gemv=cfg), ref, dtype)


# The rows GEMV: every M its own code; K = 768 in 2 splits leaves 512 + 256; N = 37 a partial row tile. Random blocks
# reach every bit pattern of the quants, the 5th/6th bits and the packed scales.
ROWS_CASES = [(1, 768, 2), (3, 512, None), (GEMV_MAX_M, 256, None)]  # M, K, split_k


@pytest.mark.parametrize("qtype", KERNEL_QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: f"m{c[0]}k{c[1]}s{c[2] or 1}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemv_rows(qtype: Q, case: tuple[int, int, int | None], dtype: torch.dtype, device: torch.device) -> None:
    M, K, split_k = case
    w = random_rows(qtype, 37, K, seed=M).to(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(device, dtype)
    y = dequant_matmul(x, w, qtype, K, split_k=split_k, gemv=GemvConfig(64, 256, 2, kind="rows"))
    _close(y, dequant_matmul_reference(x, w, qtype, K), dtype)


def test_gemv_rows_tiles_and_rows_per_thread(device: torch.device) -> None:
    M, N, K = 2, 150, 512  # two row tiles of 128, the second partial; two rows a thread; fp16 x
    w = quantized_rows(Q.Q6_K, N, K).to(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).to(device, torch.float16)
    y = dequant_matmul(x, w, Q.Q6_K, K, gemv=GemvConfig(128, 256, 2, kind="rows"))
    _close(y, dequant_matmul_reference(x, w, Q.Q6_K, K), torch.float16)


def test_gemv_rows_checks() -> None:
    with pytest.raises(ValueError, match="kind='tiles'"):
        GemvConfig(kind="tiles")
    for bad in (dict(dot=True), dict(block_k=128), dict(block_n=64, num_warps=4)):
        with pytest.raises(ValueError, match="needs dot=False, block_k=256"):
            GemvConfig(**{"block_n": 128, "num_warps": 4, "kind": "rows", **bad})
    rows = GemvConfig(64, 256, 2, kind="rows")
    with pytest.raises(ValueError, match="K % 256 == 0"):
        dequant_matmul(torch.zeros(1, 800), random_rows(Q.Q8_0, 4, 800), Q.Q8_0, 800, gemv=rows)
    shifted = torch.zeros(4 * 144 + 2, dtype=torch.uint8)[2:].view(4, 144)  # rows at 2 mod 4
    with pytest.raises(ValueError, match="w_raw 4-byte aligned"):
        dequant_matmul(torch.zeros(1, 256), shifted, Q.Q4_K, 256, gemv=rows)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0], ids=lambda q: q.name)
@pytest.mark.parametrize("cfg", [GemmConfig(16, 16, 64, 4, 1), GemmConfig(32, 64, 256, 4, 2)],
                         ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}")
def test_gemm_tiles(qtype: Q, cfg: GemmConfig, device: torch.device) -> None:
    M, N, K = GEMV_MAX_M + 27, 72, 512 if qtype != Q.Q5_0 else 800  # no dimension a tile multiple
    w = random_rows(qtype, N, K).to(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(device)
    _close(dequant_matmul(x, w, qtype, K, gemm=cfg), dequant_matmul_reference(x, w, qtype, K), torch.float32)


def test_gemv_config_choice_and_checks() -> None:
    assert gemv_config(Q.Q4_K, 4, 18432, 7168, torch.bfloat16).dot
    assert not gemv_config(Q.Q4_K, 4, 18432, 7168, torch.float32).dot  # fp32 x keeps fp32 products
    with pytest.raises(ValueError, match="power of 2 >= 64"):
        GemvConfig(16, 96, 4)
    with pytest.raises(ValueError, match="need a power of 2"):
        GemvConfig(12, 256, 4)
    with pytest.raises(ValueError, match="block_n >= 16"):
        GemvConfig(8, 256, 4, dot=True)
    with pytest.raises(ValueError, match=r"power of 2 >= 16 \(tl.dot\)"):
        GemmConfig(block_m=8)
    with pytest.raises(ValueError, match="needs fp16 or bf16 x"):
        dequant_matmul(torch.zeros(1, 256), random_rows(Q.Q4_K, 4, 256), Q.Q4_K, 256, gemv=GemvConfig(16, dot=True))


def test_strided_rows_of_x(device: torch.device) -> None:
    K = 256
    w = random_rows(Q.Q8_0, 32, K).to(device)
    x = torch.randn(3, 2 * K).to(device)[:, :K]  # row stride 2K
    _close(dequant_matmul(x, w, Q.Q8_0, K), dequant_matmul_reference(x, w, Q.Q8_0, K), torch.float32)


@pytest.mark.parametrize("M", [2, GEMV_MAX_M + 5], ids=["gemv", "gemm"])
def test_out_is_filled_in_place(M: int, device: torch.device) -> None:
    K, N = 256, 48
    w = random_rows(Q.Q4_K, N, K).to(device)
    x = torch.randn(M, K).to(device)
    rows = torch.full((M + 3, N), float("nan"), device=device)
    y = dequant_matmul(x, w, Q.Q4_K, K, out=rows[1 : M + 1])  # a contiguous slice of a larger buffer
    assert y.data_ptr() == rows[1].data_ptr()
    _close(rows[1 : M + 1], dequant_matmul_reference(x, w, Q.Q4_K, K), torch.float32)
    assert rows[0].isnan().all() and rows[M + 1 :].isnan().all()
    with pytest.raises(ValueError, match=r"expected contiguous torch.float32 \[2, 48\]"):
        dequant_matmul(x[:2], w, Q.Q4_K, K, out=torch.empty(2, 2 * N, device=device)[:, :N])


@pytest.mark.parametrize(
    ("x", "w", "qtype", "match"),
    [
        (torch.zeros(2, 256), torch.zeros(4, 144, dtype=torch.uint8), Q.Q2_K, "Q2_K has no kernel"),
        (torch.zeros(2, 256, dtype=torch.int32), torch.zeros(4, 144, dtype=torch.uint8), Q.Q4_K, "x is torch.int32"),
        (torch.zeros(2, 128), torch.zeros(4, 144, dtype=torch.uint8), Q.Q4_K, r"expected \[M, 256\]"),
        (torch.zeros(2, 256).T.contiguous().T, torch.zeros(4, 144, dtype=torch.uint8), Q.Q4_K, "unit stride"),
        (torch.zeros(2, 256), torch.zeros(4, 140, dtype=torch.uint8), Q.Q4_K, r"expected uint8 \[N, 144\]"),
        (torch.zeros(2, 256), torch.zeros(4, 144, dtype=torch.int8), Q.Q4_K, "w_raw is torch.int8"),
    ],
)
def test_launcher_rejects_bad_inputs(x: torch.Tensor, w: torch.Tensor, qtype: Q, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dequant_matmul(x, w, qtype, 256)
