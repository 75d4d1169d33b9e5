"""rotary_ (in place) against RotaryEmbedding.apply."""

from __future__ import annotations

import pytest
import torch

from ksdk.kernels.rotary import rotary_, rotary_reference


def _cos_sin(T: int, half: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(half) / half))[None, :]
    return freqs.cos().to(device), freqs.sin().to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 16), (2, 5, 16), (1, 20, 64)])
def test_rotary_matches_reference_in_place(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    cos, sin = _cos_sin(shape[0], shape[-1] // 2, device)
    ref = rotary_reference(x, cos, sin)
    out = rotary_(x, cos, sin)
    assert out is x
    if dtype == torch.float32:  # a fused multiply-add the compiler may form moves the last bit
        torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)
    else:  # every step rounded as the eager ops round it: bit-identical
        assert torch.equal(x, ref)


def test_rotary_of_a_strided_view_leaves_the_rest(device: torch.device) -> None:
    """q [T, H, nope + rope]: rotating q[..., nope:] in place keeps q_nope."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 4, 24, generator=g).to(torch.float16).to(device)
    before = q.clone()
    cos, sin = _cos_sin(3, 8, device)
    rotary_(q[..., 8:], cos, sin)
    assert torch.equal(q[..., :8], before[..., :8])
    assert torch.equal(q[..., 8:], rotary_reference(before[..., 8:], cos, sin))


def test_launcher_rejects_bad_inputs(device: torch.device) -> None:
    x = torch.randn(2, 16, device=device)
    cos, sin = _cos_sin(2, 8, device)
    with pytest.raises(ValueError, match=r"cos is torch.float64 \(2, 8\)"):
        rotary_(x, cos.double(), sin)
    with pytest.raises(ValueError, match="R even"):
        rotary_(x[:, :15], cos, sin)


@pytest.mark.gpu
def test_r1_sizes_on_the_gpu_are_bit_identical_in_bf16() -> None:
    """R1's q [B, 128 heads, 128 + 64] rotated in its rope part, and k_pe [B, 64]."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(11)
    q = torch.randn(4, 128, 192, generator=g).to(torch.bfloat16).to(device)
    cos, sin = _cos_sin(4, 32, device)
    ref = rotary_reference(q[..., 128:], cos, sin)
    rotary_(q[..., 128:], cos, sin)
    assert torch.equal(q[..., 128:], ref)
