"""Routed experts streamed to the GPU (ksdk.offload.gpu_experts) and the CPU/GPU choice (HybridRoutedExperts).

On this CPU machine the per-expert math (route plan, gate/up, SiLU·up, down, weighted index_add) runs on CPU
tensors through Triton's interpreter against ``TorchExperts``; staging, streams and calibration are
``gpu``-marked.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from gguf.constants import GGMLQuantizationType as Q

from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.errors import InvalidRequestError, ModelFileError, UnsupportedQuantError
from ksdk.layers.moe import TorchExperts
from ksdk.offload.gpu_experts import (
    ExpertLayout,
    ExpertStaging,
    GPUStreamedExperts,
    StreamCrossover,
    accumulate_experts,
    route_plan,
)
from ksdk.offload.options import ExpertOptions
from ksdk.offload.routed import HybridRoutedExperts
from ksdk.testing import tiny_gguf
from ksdk.weights.gguf_file import GGUFFile, TensorView

# Against TorchExperts on the same dequantized weights, relative to max |y|: fp32 differs only in summation
# order (the GEMM kernel multiplies in IEEE fp32); bf16 rounds activations, gate/up outputs and tl.dot inputs.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@functools.cache
def tiny_layer_views() -> tuple[TensorView, TensorView, TensorView]:
    """The tiny Q4_K model's first MoE layer: 16 experts, hidden 256, intermediate 256, gate and up both Q4_K."""
    gguf = GGUFFile.open(tiny_gguf("v3", "Q4_K"))
    return tuple(gguf.tensor(f"blk.1.ffn_{w}_exps.weight") for w in ("gate", "up", "down"))  # type: ignore[return-value]


def mixed_views(n_expert: int = 4) -> tuple[TensorView, TensorView, TensorView]:
    """gate, up, down in three different types: gate and up take separate launches."""
    H, I = 256, 256
    shapes = {"gate": (Q.Q4_K, I, H), "up": (Q.Q5_K, I, H), "down": (Q.Q6_K, H, I)}
    views = []
    for seed, (name, (qtype, rows, cols)) in enumerate(shapes.items()):
        raw = random_expert_tensor(qtype, n_expert, rows, cols, seed=seed, scale=cols**-0.5).raw
        views.append(TensorView(f"ffn_{name}_exps.weight", qtype, (n_expert, rows, cols), raw))
    return tuple(views)  # type: ignore[return-value]


def random_routing(num_tokens: int, n_expert: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] (distinct per token) and positive weights [T, k] fp32."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, n_expert, generator=gen).topk(k, dim=1).indices
    return ids, torch.rand(num_tokens, k, generator=gen) + 0.1


def expert_bytes(views: tuple[TensorView, ...], e: int) -> torch.Tensor:
    return torch.cat([torch.from_numpy(v.raw[e].copy()).reshape(-1) for v in views])


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float().cpu() - ref.float().cpu()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert scale > 0 and err <= TOLERANCE[dtype] * scale, f"max error {err} vs max |y| {scale}"


# ---- on the CPU (Triton's interpreter) ----


def test_route_plan_groups_tokens_by_expert() -> None:
    ids = torch.tensor([[2, 0], [0, 3], [2, 3]])
    weights = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    plan = route_plan(ids, weights)
    assert plan.experts == [0, 2, 3] and plan.counts == [2, 2, 2] and plan.starts == [0, 2, 4]
    assert plan.tokens.tolist() == [0, 1, 0, 2, 1, 2]
    assert plan.weights.tolist() == pytest.approx([0.2, 0.3, 0.1, 0.5, 0.4, 0.6])


def test_route_plan_chunks_hold_whole_experts() -> None:
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 1]])  # counts: 0: 3, 1: 3, 2: 1, 3: 1
    plan = route_plan(ids, torch.ones(4, 2))
    assert plan.counts == [3, 3, 1, 1]
    assert plan.chunks(4) == [(0, 1), (1, 3), (3, 4)]
    assert plan.chunks(2) == [(0, 1), (1, 2), (2, 4)]  # an expert larger than the chunk stays whole
    assert plan.chunks(100) == [(0, 4)]
    assert route_plan(torch.full((2, 2), -1), torch.ones(2, 2)).chunks(4) == []


@pytest.mark.parametrize("views", ["tiny", "mixed"])
@pytest.mark.parametrize("num_tokens", [5, 24], ids=lambda t: f"T{t}")
def test_per_expert_math_matches_torch_experts(views: str, num_tokens: int) -> None:
    """The same calls GPUStreamedExperts makes per expert, on CPU tensors. Tokens pick 2 of 4 experts (of the
    tiny layer's 16: experts 1, 6, 11, 15), so at T=24 each gets about 12 rows and the GEMM kernel runs; at
    T=5 the GEMV kernel."""
    gate, up, down = tiny_layer_views() if views == "tiny" else mixed_views()
    layout = ExpertLayout.from_views(gate, up, down)
    chosen = torch.tensor([1, 6, 11, 15]) if views == "tiny" else torch.arange(4)
    ids, weights = random_routing(num_tokens, len(chosen), 2, seed=num_tokens)
    ids = chosen[ids]
    x = torch.randn(num_tokens, layout.hidden, generator=torch.Generator().manual_seed(1))
    out = torch.zeros(num_tokens, layout.hidden)
    plan = route_plan(ids, weights)
    for first, last in plan.chunks(max_pairs=num_tokens):  # two or more chunks: each gathers and adds back
        accumulate_experts(out, x, plan, first, last, lambda e: expert_bytes((gate, up, down), e), layout)
    ref = TorchExperts(gate, up, down, torch.device("cpu"), torch.float32).forward(x, ids, weights)
    assert_close(out, ref, torch.float32)


def test_layout_refuses_types_without_a_gpu_kernel() -> None:
    gate, up, down = mixed_views()
    f16 = TensorView("blk.1.ffn_up_exps.weight", Q.F16, up.shape, random_expert_tensor(Q.F16, *up.shape).raw)
    with pytest.raises(UnsupportedQuantError, match="blk.1.ffn_up_exps.weight"):
        ExpertLayout.from_views(gate, f16, down)


def test_layout_refuses_mismatched_shapes() -> None:
    gate, up, down = mixed_views()
    with pytest.raises(ModelFileError, match="ffn_down_exps.weight"):
        ExpertLayout.from_views(gate, up, TensorView(down.name, down.qtype, (4, 128, 256), down.raw[:, :128]))


def test_crossover_from_one_cpu_and_one_gpu_time() -> None:
    crossover = StreamCrossover(min_tokens=256)
    assert not crossover.needs_measuring(255) and crossover.needs_measuring(256)
    assert not crossover.use_gpu(10_000)  # unknown yet: the CPU
    # R1's figures (DESIGN.md, issue 6): 750 ms on the CPU at 1024 tokens, the layer's experts over PCIe in 135 ms
    assert crossover.record(1024, 0.750, 0.135) == math.ceil(0.135 / (0.750 / 1024)) == 185
    assert not crossover.needs_measuring(4096)
    assert crossover.use_gpu(185) and not crossover.use_gpu(184)
    assert crossover.measurement is not None and crossover.measurement.tokens == 1024


def test_given_threshold_is_used_and_checked() -> None:
    crossover = StreamCrossover(64)
    assert not crossover.needs_measuring(1000) and crossover.use_gpu(64) and not crossover.use_gpu(63)
    with pytest.raises(ValueError, match="threshold=0"):
        StreamCrossover(0)


@pytest.mark.parametrize("value", [-1, True, 1.5, "64"])
def test_bad_gpu_stream_threshold_is_refused(value: object) -> None:
    with pytest.raises(InvalidRequestError, match=f"gpu_stream_threshold={value!r}"):
        ExpertOptions(gpu_stream_threshold=value)  # type: ignore[arg-type]


class _Recording:
    """A RoutedExperts stand-in that returns a constant and counts its calls."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0
        self._x: torch.Tensor | None = None

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.calls += 1
        self._x = x

    def wait(self) -> torch.Tensor:
        assert self._x is not None
        return torch.full(self._x.shape, self.value)


def test_hybrid_picks_the_path_by_token_count() -> None:
    cpu, gpu = _Recording(1.0), _Recording(2.0)
    hybrid = HybridRoutedExperts(cpu, gpu, StreamCrossover(16))  # type: ignore[arg-type]
    for num_tokens, path, value in [(15, "cpu", 1.0), (16, "gpu", 2.0), (1, "cpu", 1.0)]:
        ids, weights = random_routing(num_tokens, 8, 2, seed=0)
        hybrid.submit(torch.zeros(num_tokens, 4), ids, weights)
        assert hybrid.last_path == path and torch.equal(hybrid.wait(), torch.full((num_tokens, 4), value))
    assert (cpu.calls, gpu.calls) == (2, 1)


# ---- on a GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_experts_match_torch_experts(dtype: torch.dtype) -> None:
    """More experts than staging slots (slots reused), gate/up fused (tiny) and separate (mixed), one staging
    area growing between layers of different expert sizes, GEMV and GEMM row counts."""
    device = torch.device("cuda")
    staging = ExpertStaging(device)
    for views, k in [(tiny_layer_views(), 4), (mixed_views(), 2)]:
        experts = GPUStreamedExperts(*views, staging=staging)
        reference = TorchExperts(*views, device=device, dtype=torch.float32)
        for num_tokens in (3, 64):
            ids, weights = random_routing(num_tokens, views[0].shape[0], k, seed=num_tokens)
            x = torch.randn(num_tokens, experts.layout.hidden, generator=torch.Generator().manual_seed(2))
            x, ids, weights = x.to(device), ids.to(device), weights.to(device)
            experts.submit(x.to(dtype), ids, weights)
            out = experts.wait()
            assert out.dtype == torch.float32 and out.device.type == "cuda"
            assert_close(out, reference.forward(x, ids, weights), dtype)
    assert staging.slot_bytes == max(ExpertLayout.from_views(*v).nbytes for v in (tiny_layer_views(), mixed_views()))


def _hybrid(threshold: int | None, min_tokens: int = 32) -> HybridRoutedExperts:
    from ksdk.offload.cpu_experts import CPUExperts
    from ksdk.offload.routed import NativeRoutedExperts

    device = torch.device("cuda")
    views = tiny_layer_views()
    cpu = NativeRoutedExperts(CPUExperts(*views, num_threads=2), device)
    gpu = GPUStreamedExperts(*views, staging=ExpertStaging(device))
    return HybridRoutedExperts(cpu, gpu, StreamCrossover(threshold, min_tokens=min_tokens))


@pytest.mark.gpu
def test_hybrid_runs_each_path_and_both_agree() -> None:
    """Native experts quantize activations to 8 bits: cosine ≥ 0.999 against the GPU's fp32 result."""
    hybrid = _hybrid(threshold=16)
    results = {}
    for num_tokens, path in [(8, "cpu"), (16, "gpu")]:
        ids, weights = random_routing(16, 16, 4, seed=3)
        x = torch.randn(16, 256, generator=torch.Generator().manual_seed(4))[:num_tokens].cuda()
        hybrid.submit(x, ids[:num_tokens].cuda(), weights[:num_tokens].cuda())
        results[path] = hybrid.wait()
        assert hybrid.last_path == path
    cpu, gpu = results["cpu"], results["gpu"][:8]
    assert torch.nn.functional.cosine_similarity(cpu.flatten(), gpu.flatten(), dim=0).item() >= 0.999


@pytest.mark.gpu
def test_calibration_measures_a_finite_threshold() -> None:
    hybrid = _hybrid(threshold=None, min_tokens=32)
    ids, weights = random_routing(8, 16, 4, seed=5)
    hybrid.submit(torch.randn(8, 256).cuda(), ids.cuda(), weights.cuda())
    hybrid.wait()
    assert hybrid.crossover.threshold is None and hybrid.last_path == "cpu"  # too short to measure
    ids, weights = random_routing(64, 16, 4, seed=6)
    hybrid.submit(torch.randn(64, 256).cuda(), ids.cuda(), weights.cuda())
    hybrid.wait()
    threshold, measured = hybrid.crossover.threshold, hybrid.crossover.measurement
    assert threshold is not None and 1 <= threshold < 10**9 and measured is not None
    assert measured.tokens == 64 and measured.cpu_seconds > 0 and measured.gpu_seconds > 0
    assert hybrid.last_path == ("gpu" if threshold <= 64 else "cpu")


@pytest.mark.gpu
def test_model_wiring_follows_the_option() -> None:
    from ksdk.models import load_model
    from ksdk.offload.routed import NativeRoutedExperts

    path = tiny_gguf("v3", "Q4_K")
    hybrid = load_model(GGUFFile.open(path), device="cuda", experts=ExpertOptions("native", gpu_stream_threshold=8))
    never = load_model(GGUFFile.open(path), device="cuda", experts=ExpertOptions("native", gpu_stream_threshold=0))
    layers = [m.ffn.experts for m in hybrid.layers[1:]]
    assert all(isinstance(e, HybridRoutedExperts) for e in layers)
    assert len({id(e.crossover) for e in layers}) == 1 and layers[0].crossover.threshold == 8  # shared
    assert all(isinstance(m.ffn.experts, NativeRoutedExperts) for m in never.layers[1:])
