"""expert_gemv against its torch reference: every kernel quant type, experts resident or not, rows of x per
token or per pair, with and without the weighting."""

from __future__ import annotations

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from ksdk.kernels.dequant_matmul import KERNEL_QTYPES
from ksdk.kernels.expert_gemv import expert_gemv, expert_gemv_reference
from ksdk.weights.quants import bytes_per_row
from tests.kernels.test_dequant_matmul import TOLERANCE, random_rows

N_EXPERT, TOP_K = 6, 3


def _experts(qtype: Q, rows: int, K: int, n_slots: int, offset: int) -> torch.Tensor:
    """[n_slots, offset + matrix + 16] uint8: a random matrix at ``offset`` of each slot, other bytes random."""
    nbytes = rows * bytes_per_row(qtype, K)
    experts = torch.randint(0, 256, (n_slots, offset + nbytes + 16), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(1))
    for s in range(n_slots):
        experts[s, offset : offset + nbytes] = random_rows(qtype, rows, K, seed=s).flatten()
    return experts


@pytest.mark.parametrize("qtype", KERNEL_QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expert_gemv_matches_reference(qtype: Q, dtype: torch.dtype, device: torch.device) -> None:
    T, K, rows, offset = 3, 512, 40, 34  # rows not a tile multiple; an offset only 2-byte aligned
    slots = torch.tensor([1, -1, 0, -1, 2, -1], dtype=torch.int32)  # experts 0, 2, 4 resident
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randperm(N_EXPERT, generator=g)[:TOP_K] for _ in range(T)])  # [T, k] int64
    experts = _experts(qtype, rows, K, 3, offset)
    x = torch.randn(T, K, generator=g).to(dtype)
    scale = torch.rand(T, TOP_K, generator=g)
    dev = [t.to(device) for t in (x, experts, slots, ids, scale)]
    for per_pair in (False, True):
        xs = x.repeat_interleave(TOP_K, 0) if per_pair else x
        xd = xs.to(device)
        for sc in (None, scale):
            y = expert_gemv(xd, dev[1], offset, rows, qtype, dev[2], dev[3], per_pair=per_pair,
                            scale=None if sc is None else dev[4])
            ref = expert_gemv_reference(xs, experts, offset, rows, qtype, slots, ids, per_pair=per_pair, scale=sc)
            assert y.dtype == (dtype if sc is None else torch.float32)
            y = y.cpu().float()
            missing = (slots[ids.flatten()] < 0)
            assert torch.equal(y[missing], torch.zeros_like(y[missing]))  # experts not resident: exact zeros
            scale_ = ref.float().abs().max().item()
            assert (y - ref.float()).abs().max().item() <= TOLERANCE[dtype] * scale_


def test_expert_gemv_refuses_bad_shapes(device: torch.device) -> None:
    experts = torch.zeros(2, 100, dtype=torch.uint8, device=device)
    slots = torch.zeros(4, dtype=torch.int32, device=device)
    ids = torch.zeros(1, 2, dtype=torch.int64, device=device)
    x = torch.zeros(1, 256, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        expert_gemv(x, experts, 0, 2, Q.Q4_K, slots, ids)  # 2 rows of 144 bytes > 100
    with pytest.raises(ValueError, match="expected int32"):
        expert_gemv(x, torch.zeros(2, 400, dtype=torch.uint8, device=device), 0, 2, Q.Q4_K, slots.long(), ids)
