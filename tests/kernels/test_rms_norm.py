"""rms_norm and add_rms_norm against their torch references (and RMSNorm itself)."""

from __future__ import annotations

import pytest
import torch

from ksdk.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from ksdk.layers.norm import RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Only the sum of squares is ordered differently: fp32 rounding, which moves a half-precision output by at
# most one unit in its last place now and then.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype).to(device)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 256), (2, 3, 100)])
def test_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    x, weight = _inputs(shape, dtype, dtype, device)
    out = rms_norm(x, weight, 1e-6)
    ref = rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_rms_norm_reads_a_strided_slice_and_promotes_like_torch(device: torch.device) -> None:
    """A column slice (MLA normalizes kv[:, :rank]) with an fp32 weight on fp16 rows: the output is fp32."""
    kv, _ = _inputs((4, 80), torch.float16, torch.float16, device, seed=1)
    _, weight = _inputs((64,), torch.float32, torch.float32, device, seed=2)
    out = rms_norm(kv[:, :64], weight, 1e-5)
    ref = rms_norm_reference(kv[:, :64], weight, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=1e-3)  # the fp16 rounding before the weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_reference(dtype: torch.dtype, device: torch.device) -> None:
    x, weight = _inputs((5, 192), dtype, dtype, device, seed=3)
    delta, _ = _inputs((5, 192), dtype, dtype, device, seed=4)
    total, out = add_rms_norm(x, delta, weight, 1e-6)
    ref_total, ref = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert torch.equal(total, ref_total)  # one rounded add, as torch's
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_rmsnorm_module_uses_the_same_math(device: torch.device) -> None:
    """The module's torch path on the CPU, its kernel on a GPU."""
    x, weight = _inputs((3, 64), torch.float16, torch.float16, device, seed=5)
    delta, _ = _inputs((3, 64), torch.float16, torch.float16, device, seed=6)
    norm = RMSNorm(weight, 1e-6)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, weight, 1e-6), rtol=2e-3, atol=1e-3)
    total, out = norm.add_and_norm(x, delta)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(out, rms_norm_reference(x + delta, weight, 1e-6), rtol=2e-3, atol=1e-3)


def test_launcher_rejects_bad_inputs(device: torch.device) -> None:
    x, weight = _inputs((2, 16), torch.float32, torch.float32, device)
    with pytest.raises(ValueError, match="expected a contiguous float"):
        rms_norm(x, weight[:8], 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(x.t(), weight, 1e-6)
    with pytest.raises(ValueError, match="delta is torch.float16"):
        add_rms_norm(x, x.half(), weight, 1e-6)


@pytest.mark.gpu
def test_r1_sizes_on_the_gpu() -> None:
    """R1's hidden size in bf16: the fused add is exact, and the norm's output within one bf16 rounding."""
    device = torch.device("cuda")
    x, weight = _inputs((16, 7168), torch.bfloat16, torch.bfloat16, device, seed=8)
    delta, _ = _inputs((16, 7168), torch.bfloat16, torch.bfloat16, device, seed=9)
    total, out = add_rms_norm(x, delta, weight, 1e-6)
    ref_total, ref = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)
    assert (out != ref).float().mean() < 0.01  # only ties broken by the sum order differ
    q, w = _inputs((16, 1536), torch.bfloat16, torch.bfloat16, device, seed=10)
    torch.testing.assert_close(rms_norm(q, w, 1e-6), rms_norm_reference(q, w, 1e-6), rtol=1.6e-2, atol=1e-2)
