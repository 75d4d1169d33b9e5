"""Experts streamed to the GPU straight from registered process memory, and the CPU+GPU split of long batches.

The split's planning is tested in test_expert_split.py; here: -1 slots in the route plan (CPU), and on a GPU
that direct copies equal staged ones and that a split call equals the CPU's and the GPU's parts added.
"""

from __future__ import annotations

import pytest
import torch

from ksdk.offload.gpu_experts import ExpertStaging, GPUStreamedExperts, StreamCrossover, route_plan
from ksdk.offload.options import ExpertOptions
from ksdk.testing import tiny_gguf
from ksdk.weights.gguf_file import GGUFFile, TensorView


def test_route_plan_skips_slots_marked_minus_one() -> None:
    ids = torch.tensor([[2, -1], [-1, 3], [2, 3]])
    weights = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    plan = route_plan(ids, weights)
    assert plan.experts == [2, 3] and plan.counts == [2, 2]
    assert plan.tokens.tolist() == [0, 2, 1, 2]
    assert plan.weights.tolist() == pytest.approx([0.1, 0.5, 0.4, 0.6])
    empty = route_plan(torch.full((2, 2), -1), weights[:2])
    assert empty.experts == [] and empty.tokens.numel() == 0


# ---- on a GPU ----


def _views() -> tuple[TensorView, TensorView, TensorView]:
    """The tiny Q4_K model's first MoE layer: 16 experts, hidden 256, intermediate 256."""
    gguf = GGUFFile.open(tiny_gguf("v3", "Q4_K"))
    return tuple(gguf.tensor(f"blk.1.ffn_{w}_exps.weight") for w in ("gate", "up", "down"))  # type: ignore[return-value]


def _routing(num_tokens: int, seed: int, n_expert: int = 16, k: int = 4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, 256, generator=gen)
    ids = torch.rand(num_tokens, n_expert, generator=gen).topk(k, dim=1).indices
    weights = torch.rand(num_tokens, k, generator=gen) + 0.1
    return x.cuda(), ids.cuda(), weights.cuda()


def _hybrid(threshold: int, *, in_ram: bool, split: bool = True):  # noqa: ANN202
    from ksdk.offload.cpu_experts import CPUExperts
    from ksdk.offload.hybrid import HybridRoutedExperts
    from ksdk.offload.routed import NativeRoutedExperts

    device = torch.device("cuda")
    views = _views()
    cpu = NativeRoutedExperts(CPUExperts(*views, num_threads=2, copy_to_ram=in_ram), device)
    gpu = GPUStreamedExperts(*views, staging=ExpertStaging(device))
    return HybridRoutedExperts(cpu, gpu, StreamCrossover(threshold), split=split)


@pytest.mark.gpu
def test_registered_memory_streams_the_same_bytes_as_staging() -> None:
    """Bit-identical: the same kernels on the same bytes, only the copy path differs. More experts than slots."""
    from ksdk.offload.host_memory import ExpertHostMemory

    views = _views()
    staging = ExpertStaging(torch.device("cuda"))
    staged = GPUStreamedExperts(*views, staging=staging)
    direct = GPUStreamedExperts(*views, staging=staging)
    memory = ExpertHostMemory([v.raw for v in views])
    assert direct.use_host_memory(memory) and direct.direct and memory.registered and not staged.direct
    for num_tokens in (3, 64):
        x, ids, weights = _routing(num_tokens, seed=num_tokens)
        staged.submit(x, ids, weights)
        want = staged.wait()
        direct.submit(x, ids, weights)
        got = direct.wait()
        assert torch.equal(got, want) and want.abs().max() > 0
    direct.close()
    assert not memory.registered and not direct.direct
    direct.submit(x, ids, weights)  # after close: staged copies from the same process memory
    assert torch.equal(direct.wait(), want)


@pytest.mark.gpu
def test_split_call_equals_its_cpu_and_gpu_parts_and_the_cpu_alone() -> None:
    hybrid = _hybrid(threshold=16, in_ram=True)
    assert hybrid.gpu.direct and hybrid.split and hybrid.crossover.split is not None
    x, ids, weights = _routing(64, seed=1)
    hybrid.submit(x[:8], ids[:8], weights[:8])  # short: the CPU alone
    hybrid.wait()
    assert hybrid.last_path == "cpu"

    hybrid.submit(x, ids, weights)  # first long call: calibrates the split's rates, then splits
    assert hybrid.crossover.split.rates is not None
    hybrid.wait()
    # Force a real split: the CPU as fast per expert as the GPU takes about half of them.
    from ksdk.offload.expert_split import SplitRates

    hybrid.crossover.split.rates = SplitRates(cpu_per_pair=1e-6, cpu_per_expert=1e-6, gpu_per_expert=1e-5)
    counts = torch.bincount(ids.flatten().cpu(), minlength=16)
    cpu_mask = hybrid.crossover.split.plan(counts)
    assert 0 < int(cpu_mask.sum()) < int((counts > 0).sum())
    hybrid.submit(x, ids, weights)
    assert hybrid.last_path == "cpu+gpu"
    split_out = hybrid.wait()

    on_cpu = cpu_mask.cuda()[ids]
    report = hybrid.last_split
    assert report is not None and report.cpu_tokens == int(on_cpu.any(dim=1).sum()) < 64  # only its tokens
    assert report.cpu_experts == int(cpu_mask.sum()) and report.cpu_experts + report.gpu_experts == int((counts > 0).sum())
    hybrid.cpu.submit(x, torch.where(on_cpu, ids, -1), weights)
    cpu_part = hybrid.cpu.wait()
    hybrid.gpu.submit(x, torch.where(on_cpu, -1, ids), weights)
    gpu_part = hybrid.gpu.wait()
    torch.testing.assert_close(split_out, cpu_part + gpu_part, rtol=1e-6, atol=1e-6)
    hybrid.cpu.submit(x, ids, weights)
    cpu_only = hybrid.cpu.wait()
    # Native experts quantize activations to 8 bits, the GPU's part is fp32: cosine >= 0.999 (as for the paths).
    assert torch.nn.functional.cosine_similarity(split_out.flatten(), cpu_only.flatten(), dim=0).item() >= 0.999
    hybrid.close()
    assert not hybrid.split and not hybrid.gpu.direct


@pytest.mark.gpu
def test_memory_mapped_experts_stage_and_do_not_split() -> None:
    hybrid = _hybrid(threshold=16, in_ram=False)
    assert not hybrid.gpu.direct and not hybrid.split and hybrid.crossover.split is None
    x, ids, weights = _routing(32, seed=2)
    hybrid.submit(x, ids, weights)
    hybrid.wait()
    assert hybrid.last_path == "gpu"


@pytest.mark.gpu
def test_model_in_ram_streams_directly() -> None:
    from ksdk.models import load_model
    from ksdk.offload.hybrid import HybridRoutedExperts

    model = load_model(GGUFFile.open(tiny_gguf("v3", "Q4_K")), device="cuda",
                       experts=ExpertOptions("native", memory="ram", gpu_stream_threshold=8))
    layers = [m.ffn.experts for m in model.layers[1:]]
    assert all(isinstance(e, HybridRoutedExperts) and e.gpu.direct and e.split for e in layers)
    assert len({id(e.crossover.split) for e in layers}) == 1  # one set of rates for the model
