"""ksdk.weights.quantize: bit-exact where gguf-py quantizes, bounded error for our k-quants."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from ksdk.errors import UnsupportedQuantError
from ksdk.weights.gguf_file import GGUFFile
from ksdk.weights.quantize import QUANTIZABLE_QTYPES, quantize
from ksdk.weights.quants import bytes_per_row, dequantize

Q = GGMLQuantizationType

# types gguf.quants.quantize implements: ours must produce the very same bytes
GGUF_QUANTIZED = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]

# relative RMS error of quantize -> gguf.quants.dequantize on standard-normal rows
MAX_REL_RMS = {
    Q.F32: 0.0,
    Q.F16: 5e-4,
    Q.BF16: 4e-3,
    Q.Q8_0: 0.01,
    Q.Q6_K: 0.03,
    Q.Q5_0: 0.06,
    Q.Q5_1: 0.06,
    Q.Q5_K: 0.06,
    Q.Q4_0: 0.12,
    Q.Q4_1: 0.12,
    Q.Q4_K: 0.12,
    Q.Q3_K: 0.25,
    Q.Q2_K: 0.40,
}


def _gguf_dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


def _rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :256] = 0.0  # an all-zero block
    flat[-1, 7] = 40.0  # an outlier
    return x


def test_every_listed_type_is_quantizable() -> None:
    assert set(MAX_REL_RMS) == set(QUANTIZABLE_QTYPES)


@pytest.mark.parametrize("qtype", GGUF_QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(4, 256), (3, 2, 512)], ids=str)
def test_matches_gguf_quantize_bit_exactly(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    x = _rows(np.random.default_rng(3), shape)
    ours = quantize(x, qtype)
    with np.errstate(divide="ignore"):
        ref = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    assert ours.shape == (*shape[:-1], bytes_per_row(qtype, shape[-1]))
    assert np.array_equal(ours, ref.reshape(ours.shape))


def test_q8_0_rounds_halves_away_from_zero_like_ggml() -> None:
    # values whose scaled form is a float32 just below .5: adding 0.5 would wrongly round up
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 127.0
    x[0, 1] = np.nextafter(np.float32(0.5), np.float32(0))
    x[0, 2] = -2.5
    x[0, 3] = 2.5
    q = quantize(x, Q.Q8_0)[0, 2:].view(np.int8)
    assert q[:4].tolist() == [127, 0, -3, 3]
    with np.errstate(divide="ignore"):
        assert np.array_equal(quantize(x, Q.Q8_0), gguf.quants.quantize(x, Q.Q8_0))


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE_QTYPES, key=lambda q: q.name), ids=lambda q: q.name)
def test_round_trip_error_is_bounded(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    y = _gguf_dequantize(quantize(x, qtype), qtype, x.shape)
    rel_rms = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))
    assert rel_rms <= MAX_REL_RMS[qtype], f"{qtype.name}: relative RMS error {rel_rms:.4f}"


@pytest.mark.parametrize("qtype", sorted(QUANTIZABLE_QTYPES, key=lambda q: q.name), ids=lambda q: q.name)
def test_zero_blocks_and_outliers_stay_valid(qtype: GGMLQuantizationType) -> None:
    x = _rows(np.random.default_rng(5), (2, 512)) * np.float32(0.02)
    y = dequantize(quantize(x, qtype), qtype, x.shape).numpy()
    assert np.all(np.isfinite(y))
    assert np.all(y[0, :256] == 0.0)  # zero blocks decode to exact zeros
    assert abs(y[-1, 7] - x[-1, 7]) <= 0.15 * abs(x[-1, 7])  # an outlier sets its block's scale


def test_unsupported_type_and_bad_row_length() -> None:
    with pytest.raises(UnsupportedQuantError, match="IQ4_XS"):
        quantize(np.zeros((1, 256), np.float32), Q.IQ4_XS, name="w")
    with pytest.raises(ValueError, match="row length 100 is not a multiple of the Q4_K block size 256"):
        quantize(np.zeros((2, 100), np.float32), Q.Q4_K)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K],
                         ids=lambda q: q.name)
def test_round_trips_through_a_gguf_file(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(6)
    experts = rng.standard_normal((3, 4, 512)).astype(np.float32)
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "deepseek2")
    raw = quantize(experts, qtype)
    writer.add_tensor("blk.0.ffn_up_exps.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with GGUFFile.open(path) as f:
        view = f.tensor("blk.0.ffn_up_exps.weight")
        assert view.qtype == qtype and view.shape == (3, 4, 512)
        assert np.array_equal(view.raw, raw)
        expected = torch.from_numpy(_gguf_dequantize(raw, qtype, experts.shape))
        assert torch.equal(view.dequantize(), expected)
        assert torch.equal(view.expert(2).dequantize(), expected[2])
