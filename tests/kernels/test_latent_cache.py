"""write_latent against MLAttention's eager norm + rotate + concatenate + indexed write."""

from __future__ import annotations

import pytest
import torch

from ksdk.kernels.latent_cache import write_latent, write_latent_reference

RANK, ROPE, PAGE_SIZE, PAGES = 64, 16, 4, 6


def _inputs(T: int, dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(T, RANK + ROPE + 8, generator=g) * 2).to(dtype)[:, : RANK + ROPE]  # a row stride of its own
    weight = (1 + 0.2 * torch.randn(RANK, generator=g)).to(w_dtype)
    pos = torch.randint(0, 500, (T,), generator=g).float()
    freqs = pos[:, None] * (10000.0 ** (-torch.arange(ROPE // 2) / (ROPE // 2)))[None, :]
    slots = torch.randperm(PAGES * PAGE_SIZE, generator=g)[:T]
    args = (kv, weight, freqs.cos(), freqs.sin(), slots)
    return tuple(t.to(device) for t in args)


@pytest.mark.parametrize(("dtype", "w_dtype", "cache_dtype"), [
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16),  # fp32 norm weight: the latent is fp32 until the cache cast
    (torch.float16, torch.float16, torch.float32),
], ids=str)
@pytest.mark.parametrize("T", [1, 5])
def test_write_latent_matches_reference(T: int, dtype: torch.dtype, w_dtype: torch.dtype,
                                        cache_dtype: torch.dtype, device: torch.device) -> None:
    kv, weight, cos, sin, slots = _inputs(T, dtype, w_dtype, device, seed=T)
    pool = torch.full((PAGES, PAGE_SIZE, RANK + ROPE), 7.0, dtype=cache_dtype, device=device)  # poisoned
    ref_pool = pool.clone()
    write_latent(kv, weight, 1e-6, cos, sin, pool, slots)
    write_latent_reference(kv, weight, 1e-6, cos, sin, ref_pool, slots)
    flat, ref_flat = pool.view(-1, RANK + ROPE), ref_pool.view(-1, RANK + ROPE)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.equal(flat[untouched], ref_flat[untouched])
    tol = 1e-5 if cache_dtype == torch.float32 and dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(flat[slots], ref_flat[slots], rtol=tol, atol=tol)
    if dtype != torch.float32:  # the rotation rounds as the eager ops do: bit-identical
        assert torch.equal(flat[slots, RANK:], ref_flat[slots, RANK:])


def test_negative_slots_are_skipped(device: torch.device) -> None:
    kv, weight, cos, sin, slots = _inputs(3, torch.float32, torch.float32, device)
    pool = torch.zeros(PAGES, PAGE_SIZE, RANK + ROPE, device=device)
    slots = torch.tensor([2, -1, 5], device=device)
    write_latent(kv, weight, 1e-6, cos, sin, pool, slots)
    written = pool.view(-1, RANK + ROPE).abs().sum(-1) > 0
    assert written.nonzero().flatten().tolist() == [2, 5]


def test_launcher_rejects_bad_inputs(device: torch.device) -> None:
    kv, weight, cos, sin, slots = _inputs(2, torch.float32, torch.float32, device)
    pool = torch.zeros(PAGES, PAGE_SIZE, RANK + ROPE, device=device)
    with pytest.raises(ValueError, match="slot_mapping is torch.int32"):
        write_latent(kv, weight, 1e-6, cos, sin, pool, slots.int())
    with pytest.raises(ValueError, match=r"expected a contiguous float \[num_pages, page_size, 80\]"):
        write_latent(kv, weight, 1e-6, cos, sin, pool[..., :-1], slots)


@pytest.mark.gpu
def test_r1_sizes_on_the_gpu() -> None:
    """R1's latent (512 + 64) in bf16: the rotated part bit-identical, the normalized part within a rounding."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(12)
    kv = torch.randn(8, 576, generator=g).to(torch.bfloat16).to(device)
    weight = (1 + 0.2 * torch.randn(512, generator=g)).to(torch.bfloat16).to(device)
    freqs = torch.arange(8, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(32) / 32))[None, :]
    cos, sin = freqs.cos().to(device), freqs.sin().to(device)
    slots = torch.randperm(64, generator=g)[:8].to(device)
    pool = torch.full((4, 16, 576), 7.0, dtype=torch.bfloat16, device=device)
    ref_pool = pool.clone()
    write_latent(kv, weight, 1e-6, cos, sin, pool, slots)
    write_latent_reference(kv, weight, 1e-6, cos, sin, ref_pool, slots)
    flat, ref_flat = pool.view(-1, 576), ref_pool.view(-1, 576)
    assert torch.equal(flat[:, 512:], ref_flat[:, 512:])
    torch.testing.assert_close(flat, ref_flat, rtol=1.6e-2, atol=1e-2)
