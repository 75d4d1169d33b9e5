"""The CPU/GPU split of a long batch's experts: the plan from rates, and the rates from measurements."""

from __future__ import annotations

import pytest
import torch

from ksdk.offload.expert_split import ASSUMED_HOST_READ_BYTES_PER_S, ExpertSplit, SplitRates, plan_split


def _layer_seconds(counts: torch.Tensor, mask: torch.Tensor, rates: SplitRates) -> float:
    active = counts > 0
    cpu = rates.cpu_seconds(int(counts[mask].sum()), int((mask & active).sum()))
    return max(cpu, rates.gpu_seconds(int((active & ~mask).sum())))


def test_cpu_takes_the_experts_with_fewest_tokens() -> None:
    counts = torch.tensor([9, 0, 1, 5, 2, 7, 3, 0])
    mask = plan_split(counts, SplitRates(cpu_per_pair=1.0, cpu_per_expert=0.0, gpu_per_expert=4.0))
    # 6 active experts; the CPU taking the m smallest (1, 2, 3, 5, ...) vs the GPU 4 s each for the rest:
    # m=3: max(6, 12); m=4: max(11, 8) = 11, the least; m=5: max(18, 4)
    assert mask.tolist() == [False, False, True, True, True, False, True, False]
    assert not mask[counts == 0].any()


def test_plan_minimises_the_layer_time_over_every_cut() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = torch.randint(0, 40, (64,), generator=gen)
        rates = SplitRates(*(torch.rand(3, generator=gen) + 0.01).tolist())
        mask = plan_split(counts, rates)
        best = _layer_seconds(counts, mask, rates)
        order = counts.argsort(stable=True)
        order = order[counts[order] > 0]
        for m in range(order.numel() + 1):
            other = torch.zeros(64, dtype=torch.bool)
            other[order[:m]] = True
            assert best <= _layer_seconds(counts, other, rates) + 1e-9


def test_a_slow_cpu_gets_nothing_and_a_free_one_everything() -> None:
    counts = torch.tensor([3, 1, 4, 1, 5])
    assert not plan_split(counts, SplitRates(10.0, 1.0, 0.01)).any()
    assert plan_split(counts, SplitRates(0.0, 0.0, 1.0)).all()


def test_rates_are_checked() -> None:
    with pytest.raises(ValueError, match="costs must be"):
        SplitRates(-1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="costs must be"):
        SplitRates(1.0, 0.0, 0.0)


def test_calibration_from_one_cpu_and_one_gpu_call() -> None:
    split = ExpertSplit(expert_bytes=int(ASSUMED_HOST_READ_BYTES_PER_S // 1000))  # 1 ms to read an expert
    counts = torch.full((256,), 64)  # R1 at 2048 tokens: every expert, 64 tokens each
    assert not split.plan(counts).any()  # not calibrated: all on the GPU
    rates = split.calibrate(counts, cpu_seconds=1.5, gpu_seconds=0.14)
    assert rates.cpu_per_expert == pytest.approx(1e-3) and rates.gpu_per_expert == pytest.approx(0.14 / 256)
    assert rates.cpu_seconds(int(counts.sum()), 256) == pytest.approx(1.5)  # the calibration call, predicted back
    share = int(split.plan(counts).sum())
    assert 0 < share < 256 * 0.14 / 1.5 + 1  # about the GPU's share of the all-CPU time
    with pytest.raises(ValueError, match="without routed tokens"):
        split.calibrate(torch.zeros(256, dtype=torch.int64), 1.0, 1.0)


def test_rates_follow_measured_split_calls() -> None:
    split = ExpertSplit(expert_bytes=0)
    counts = torch.full((8,), 10)
    split.calibrate(counts, cpu_seconds=8.0, gpu_seconds=8.0)  # CPU 0.1 s per pair, GPU 1 s per expert
    mask = torch.tensor([True, True] + [False] * 6)
    for _ in range(20):  # the CPU side ran twice as slow as predicted (contention), the GPU at 2 s per expert
        split.record(counts, mask, cpu_seconds=4.0, gpu_seconds=12.0)
    assert split.rates is not None
    assert split.rates.cpu_per_pair == pytest.approx(0.2, rel=1e-3)
    assert split.rates.gpu_per_expert == pytest.approx(2.0, rel=1e-3)
    before = split.rates
    split.record(counts, torch.zeros(8, dtype=torch.bool), cpu_seconds=0.0, gpu_seconds=16.0)  # no CPU experts
    assert split.rates.cpu_per_pair == before.cpu_per_pair  # nothing learned about the CPU
