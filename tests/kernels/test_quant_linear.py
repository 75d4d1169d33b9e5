"""QuantLinear: the Linear contract over GGUF bytes (kernel types) and the dense fallback (the rest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from ksdk.layers.linear import Linear
from ksdk.layers.quant_linear import QuantLinear, quant_linear
from ksdk.weights.gguf_file import TensorView
from ksdk.weights.quantize import quantize


def view(qtype: Q, rows: int, cols: int) -> TensorView:
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32) * 0.05
    raw = quantize(w, qtype).reshape(rows, -1)
    raw.flags.writeable = False  # like the file mapping
    return TensorView("blk.0.attn_output.weight", qtype, (rows, cols), raw)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q5_0], ids=lambda q: q.name)
def test_matches_dense_linear_on_the_dequantized_weight(qtype: Q, device: torch.device) -> None:
    v = view(qtype, 48, 256)
    layer = quant_linear(v, device, torch.float32)
    assert isinstance(layer, QuantLinear) and layer.out_features == 48 and layer.raw.device.type == device.type
    dense = Linear(v.dequantize().to(device))
    x = torch.randn(2, 3, 256).to(device)  # leading dims are kept, as torch's linear does
    y = layer(x)
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y, dense(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.F32, Q.BF16, Q.Q4_0], ids=lambda q: q.name)
def test_types_without_a_kernel_fall_back_to_dense(qtype: Q) -> None:
    v = view(qtype, 8, 64)
    layer = quant_linear(v, torch.device("cpu"), torch.bfloat16)
    assert type(layer) is Linear and layer.weight.dtype == torch.bfloat16


def test_rejects_bytes_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"expected uint8 \[out_features, 272\]"):
        QuantLinear(torch.zeros(4, 270, dtype=torch.uint8), Q.Q8_0, 256)
    with pytest.raises(ValueError, match="Q4_0 has no kernel"):
        QuantLinear(torch.zeros(4, 144, dtype=torch.uint8), Q.Q4_0, 256)
