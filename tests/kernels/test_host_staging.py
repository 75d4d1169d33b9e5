"""The hand-off kernels between a captured step and the host experts, against the copies and eager ops they
replace. On the GPU the host side is pinned memory the kernels read and write in place; in the interpreter,
plain host tensors."""

from __future__ import annotations

import pytest
import torch

from ksdk.kernels.host_staging import add_from_host, add_from_host_reference, stage_to_host


def _host(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.full(like.shape, -1, dtype=like.dtype, pin_memory=device.type == "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 32])
def test_stage_to_host_copies_all_three(tokens: int, dtype: torch.dtype, device: torch.device) -> None:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 1000, generator=g).to(dtype).to(device)  # not a multiple of the block
    ids = torch.randint(0, 256, (tokens, 8), generator=g).to(device)
    weights = torch.rand(tokens, 8, generator=g).to(device)
    host = [_host(t, device) for t in (x, ids, weights)]
    stage_to_host(x, ids, weights, *host)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for dev, h in zip((x, ids, weights), host):
        assert torch.equal(h, dev.cpu())


def test_stage_to_host_refuses_mismatches(device: torch.device) -> None:
    x, ids, weights = (torch.zeros(2, 16, device=device), torch.zeros(2, 4, dtype=torch.int64, device=device),
                       torch.zeros(2, 4, device=device))
    with pytest.raises(ValueError, match="cannot be staged"):
        stage_to_host(x, ids, weights, torch.zeros(2, 16, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.int64),
                      torch.zeros(2, 4))


@pytest.mark.parametrize("with_shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 5])
def test_add_from_host_equals_the_eager_ops(tokens: int, dtype: torch.dtype, with_shared: bool,
                                            device: torch.device) -> None:
    g = torch.Generator().manual_seed(7 + tokens)
    host_out = (torch.randn(tokens, 1500, generator=g) * 3).pin_memory() if device.type == "cuda" else \
        torch.randn(tokens, 1500, generator=g) * 3
    shared = (torch.randn(tokens, 1500, generator=g) * 3).to(dtype).to(device) if with_shared else None
    out = add_from_host(host_out, shared, dtype, device)
    ref = add_from_host_reference(host_out, shared, dtype, device)
    assert out.dtype == dtype and out.device.type == device.type
    assert torch.equal(out, ref)  # the same two roundings, bit for bit


def test_stage_to_host_hides_resident_experts(device: torch.device) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 300, generator=g).to(device)
    ids = torch.randint(0, 16, (4, 6), generator=g).to(device)
    weights = torch.rand(4, 6, generator=g).to(device)
    slots = torch.full((16,), -1, dtype=torch.int32)
    slots[[1, 5, 9]] = torch.tensor([0, 2, 1], dtype=torch.int32)
    host = [_host(t, device) for t in (x, ids, weights)]
    stage_to_host(x, ids, weights, *host, resident_slots=slots.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    expected = torch.where(slots[ids.cpu()] >= 0, -1, ids.cpu())
    assert (expected == -1).any() and (expected >= 0).any()
    assert torch.equal(host[1], expected)
    assert torch.equal(host[0], x.cpu()) and torch.equal(host[2], weights.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_add_from_host_adds_the_resident_experts_first(dtype: torch.dtype, device: torch.device) -> None:
    g = torch.Generator().manual_seed(11)
    host_out = torch.randn(3, 700, generator=g) * 3
    if device.type == "cuda":
        host_out = host_out.pin_memory()
    resident = (torch.randn(3, 700, generator=g) * 3).to(device)
    shared = (torch.randn(3, 700, generator=g) * 3).to(dtype).to(device)
    for sh in (shared, None):
        out = add_from_host(host_out, sh, dtype, device, resident=resident)
        assert torch.equal(out, add_from_host_reference(host_out, sh, dtype, device, resident=resident))
