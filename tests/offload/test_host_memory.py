"""Expert bytes copied into process memory (ExpertHostMemory) and the CPU experts reading them."""

from __future__ import annotations

import logging
import mmap

import gguf
import numpy as np
import pytest
import torch

from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.offload import CPUExperts
from ksdk.offload.host_memory import ExpertHostMemory

Q = gguf.GGMLQuantizationType


def _layer(n_expert: int = 4) -> tuple:
    return (random_expert_tensor(Q.Q4_K, n_expert, 256, 256, seed=1),
            random_expert_tensor(Q.Q4_K, n_expert, 256, 256, seed=2),
            random_expert_tensor(Q.Q6_K, n_expert, 256, 256, seed=3))


def test_copies_are_equal_and_each_on_its_own_pages() -> None:
    raws = [v.raw for v in _layer()] + [np.arange(5, dtype=np.uint8).reshape(1, 5)]
    memory = ExpertHostMemory(raws)
    for copy, raw in zip(memory.arrays, raws):
        assert copy.shape == raw.shape and copy.dtype == np.uint8 and np.array_equal(copy, raw)
        assert copy.ctypes.data % mmap.PAGESIZE == 0
        assert not np.shares_memory(copy, raw)
    starts = [a.ctypes.data for a in memory.arrays]
    assert all(b - a >= raw.nbytes for a, b, raw in zip(starts, starts[1:], raws))
    assert memory.nbytes % mmap.PAGESIZE == 0 and memory.nbytes >= sum(r.nbytes for r in raws)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_registration_without_cuda_falls_back_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    memory = ExpertHostMemory([v.raw for v in _layer()])
    with caplog.at_level(logging.WARNING, logger="ksdk.offload.host_memory"):
        assert memory.register_cuda() is False
    assert not memory.registered and "staged copies instead" in caplog.text
    memory.close()  # nothing registered: a no-op


def test_cpu_experts_in_ram_read_their_copy_and_match_the_memmap_path() -> None:
    views = _layer()
    in_ram = CPUExperts(*views, num_threads=2, copy_to_ram=True)
    mapped = CPUExperts(*views, num_threads=2)
    assert mapped.host_memory is None and in_ram.host_memory is not None
    assert all(np.array_equal(a, v.raw) for a, v in zip(in_ram.host_memory.arrays, views))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=gen)
    ids = torch.rand(6, 4, generator=gen).topk(2, dim=1).indices
    weights = torch.rand(6, 2, generator=gen)
    assert torch.equal(in_ram.forward(x, ids, weights), mapped.forward(x, ids, weights))
