"""Which of a long batch's experts the CPU computes while the GPU streams the rest.

A layer's experts streamed to the GPU cost about the same per expert whatever its token count (the bytes
cross PCIe once), while on the CPU an expert costs its weight read plus time per (token, expert) pair. So the
CPU takes the experts with the fewest tokens, as many as keep its predicted time under the GPU's for the rest:
the layer then takes max(CPU, GPU) instead of the GPU's time alone. ``SplitRates`` holds the costs;
``ExpertSplit`` starts them from one CPU-only and one GPU-only timing and refines them after every split call,
so contention between the two sides (host memory, cores) is measured, not guessed.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

__all__ = ["ASSUMED_HOST_READ_BYTES_PER_S", "ExpertSplit", "SplitRates", "plan_split"]

logger = logging.getLogger(__name__)

# Starting guess of the CPU's cost of reading one expert's weights (refined by the measured calls): a
# middling server's read bandwidth; the term matters only for experts with few tokens.
ASSUMED_HOST_READ_BYTES_PER_S = 60e9
_SMOOTHING = 0.5  # weight of the newest measurement in the running estimates


@dataclasses.dataclass(frozen=True)
class SplitRates:
    """Seconds per unit of one MoE layer's routed-expert work on each side."""

    cpu_per_pair: float  # one (token, expert) pair on the CPU's native kernels
    cpu_per_expert: float  # one expert touched on the CPU (reading its weights once)
    gpu_per_expert: float  # one expert streamed to the GPU and multiplied there

    def __post_init__(self) -> None:
        if min(self.cpu_per_pair, self.cpu_per_expert, self.gpu_per_expert) < 0 or self.gpu_per_expert == 0:
            raise ValueError(f"{self}: costs must be >= 0, the GPU's > 0")

    def cpu_seconds(self, pairs: float, experts: float) -> float:
        return self.cpu_per_pair * pairs + self.cpu_per_expert * experts

    def gpu_seconds(self, experts: float) -> float:
        return self.gpu_per_expert * experts


def plan_split(counts: torch.Tensor, rates: SplitRates) -> torch.Tensor:
    """The experts the CPU should compute: bool [E], for ``counts`` [E] (tokens routed to each expert, host).

    The CPU gets the m active experts with the fewest tokens, m chosen to minimise max(CPU time of those, GPU
    time of the rest) under ``rates``; m = 0 when the CPU is too slow to take even one."""
    counts = counts.to(torch.int64)
    active = (counts > 0).nonzero().flatten()
    order = active[counts[active].argsort(stable=True)]  # active experts, fewest tokens first
    m = torch.arange(order.numel() + 1, dtype=torch.float64)  # experts given to the CPU
    pairs = torch.cat([torch.zeros(1, dtype=torch.float64), counts[order].double().cumsum(0)])
    layer = torch.maximum(rates.cpu_per_pair * pairs + rates.cpu_per_expert * m,
                          rates.gpu_per_expert * (order.numel() - m))
    best = int(layer.argmin())  # the first minimum: ties keep work on the GPU
    mask = torch.zeros(counts.numel(), dtype=torch.bool)
    mask[order[:best]] = True
    return mask


class ExpertSplit:
    """The CPU/GPU split shared by a model's MoE layers: rates measured once, then refined per call.

    ``expert_bytes``: one expert's bytes (gate + up + down), for the CPU's starting weight-read cost.
    """

    def __init__(self, expert_bytes: int) -> None:
        self.expert_bytes = expert_bytes
        self.rates: SplitRates | None = None

    def calibrate(self, counts: torch.Tensor, cpu_seconds: float, gpu_seconds: float) -> SplitRates:
        """Start the rates from one CPU-only and one GPU-only call on the same batch (``counts`` [E])."""
        experts, pairs = int((counts > 0).sum()), int(counts.sum())
        if experts == 0:
            raise ValueError("calibrate() on a batch without routed tokens")
        per_expert = self.expert_bytes / ASSUMED_HOST_READ_BYTES_PER_S
        per_pair = max(cpu_seconds - per_expert * experts, 0.5 * cpu_seconds) / pairs
        self.rates = SplitRates(per_pair, per_expert, gpu_seconds / experts)
        logger.info("expert split rates: CPU %.1f us per (token, expert) + %.2f ms per expert, GPU %.2f ms per "
                    "expert", 1e6 * per_pair, 1e3 * per_expert, 1e3 * self.rates.gpu_per_expert)
        return self.rates

    def plan(self, counts: torch.Tensor) -> torch.Tensor:
        """bool [E]: the experts the CPU computes (none until calibrated)."""
        if self.rates is None:
            return torch.zeros(counts.numel(), dtype=torch.bool)
        return plan_split(counts, self.rates)

    def record(self, counts: torch.Tensor, cpu_mask: torch.Tensor, cpu_seconds: float, gpu_seconds: float) -> None:
        """Refine the rates from a split call: ``cpu_seconds`` for the experts in ``cpu_mask``, ``gpu_seconds``
        for the other active ones (each side measured while the other ran). A side without experts teaches
        nothing about itself."""
        assert self.rates is not None, "record() before calibrate()"
        rates, active = self.rates, counts > 0
        cpu_experts, gpu_experts = int((active & cpu_mask).sum()), int((active & ~cpu_mask).sum())
        cpu_scale = gpu_per_expert = None
        if cpu_experts:
            predicted = rates.cpu_seconds(int(counts[cpu_mask].sum()), cpu_experts)
            cpu_scale = 1 + _SMOOTHING * (min(max(cpu_seconds / predicted, 0.25), 4.0) - 1)  # one outlier moves little
        if gpu_experts:
            gpu_per_expert = (1 - _SMOOTHING) * rates.gpu_per_expert + _SMOOTHING * gpu_seconds / gpu_experts
        self.rates = SplitRates(rates.cpu_per_pair * (cpu_scale or 1), rates.cpu_per_expert * (cpu_scale or 1),
                                gpu_per_expert or rates.gpu_per_expert)
