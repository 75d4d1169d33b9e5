"""Routed experts that run where a batch is fastest: the CPU's native kernels, the GPU, or both at once.

Short batches (decode) read few experts: the CPU's native kernels. From a measured token crossover on
(``StreamCrossover``), the layer's experts are streamed to the GPU (``GPUStreamedExperts``); when they come
from registered process memory (direct DMA, the host thread stays free), the CPU computes a measured share of
them at the same time (``ExpertSplit``): its experts' slots in ``topk_ids`` become -1 for the GPU side and the
GPU's become -1 for the native side, and the two partial sums are added.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Literal

import torch

from ksdk.offload.expert_split import ExpertSplit

if TYPE_CHECKING:  # imported lazily by the caller: it loads the Triton kernels
    from ksdk.offload.gpu_experts import GPUStreamedExperts, StreamCrossover
    from ksdk.offload.routed import NativeRoutedExperts

__all__ = ["HybridRoutedExperts", "SplitReport"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _SplitCall:
    """A split call in flight: what each side got, and when each started."""

    counts: torch.Tensor  # [E] tokens per expert, host
    cpu_mask: torch.Tensor  # [E] bool, host: the CPU's experts
    cpu_rows: torch.Tensor  # [T'] int64, device: the tokens the CPU's experts take (its output's rows)
    cpu_start: float  # perf_counter at the native submit
    gpu_start: torch.cuda.Event
    gpu_end: torch.cuda.Event


@dataclasses.dataclass(frozen=True)
class SplitReport:
    """What the last split call gave each side and how long each took (measured while the other ran)."""

    cpu_experts: int
    gpu_experts: int
    cpu_tokens: int  # the tokens sent to the CPU: those with at least one slot on its experts
    cpu_seconds: float
    gpu_seconds: float


class HybridRoutedExperts:
    """Native CPU experts for short batches, experts streamed to the GPU from ``crossover``'s threshold on.

    Until the crossover is known (measured at the first call of at least ``crossover.min_tokens`` tokens,
    or by :meth:`calibrate`) every call runs on the CPU. If the CPU experts hold their bytes in process memory
    (``ExpertOptions.memory`` "ram"/"locked"), the GPU side registers it with CUDA and copies straight from it;
    then, with ``split``, long calls also give the CPU the share of experts that ``crossover.split`` plans.
    ``last_path`` says where the last call ran: "cpu", "gpu" or "cpu+gpu"; ``last_split`` what the last split
    call gave each side.
    """

    def __init__(self, cpu: NativeRoutedExperts, gpu: GPUStreamedExperts, crossover: StreamCrossover, *,
                 split: bool = True) -> None:
        self.cpu, self.gpu, self.crossover = cpu, gpu, crossover
        memory = getattr(getattr(cpu, "experts", None), "host_memory", None)  # None: a memmap, or a stand-in
        if memory is not None:
            gpu.use_host_memory(memory)
        # Splitting needs a host thread free to enqueue the GPU side: only with direct (registered) copies.
        self.split = split and bool(getattr(gpu, "direct", False))
        if self.split and crossover.split is None:
            crossover.split = ExpertSplit(gpu.layout.nbytes)
        self.last_path: Literal["cpu", "gpu", "cpu+gpu"] | None = None
        self.last_split: SplitReport | None = None
        self._active: NativeRoutedExperts | GPUStreamedExperts | None = None
        self._split_call: _SplitCall | None = None

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        num_tokens = x.shape[0]
        if self.crossover.needs_measuring(num_tokens) or (
                self.split and self.crossover.use_gpu(num_tokens) and self._split_rates_missing()):
            self.calibrate(x, ids, weights)
        if not self.crossover.use_gpu(num_tokens):
            self._active, self.last_path = self.cpu, "cpu"
        elif self.split and self._submit_split(x, ids, weights):
            self._active, self.last_path = None, "cpu+gpu"
            return
        else:
            self._active, self.last_path = self.gpu, "gpu"
        self._active.submit(x, ids, weights)

    def wait(self) -> torch.Tensor:
        """[T, hidden] fp32 routed output on the model's device."""
        if self._split_call is not None:
            return self._wait_split()
        assert self._active is not None, "wait() without submit()"
        active, self._active = self._active, None
        return active.wait()

    def close(self) -> None:
        """Give back the CUDA registration of the expert memory (later calls copy through staging)."""
        self.gpu.close()
        self.split = False

    def calibrate(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> int | None:
        """Time one CPU and one GPU call on this batch (after an untimed GPU call that compiles the kernels
        and allocates the staging slots); set the crossover's threshold from them when it is measured (not
        given), and the split's starting rates when splitting. Returns the threshold."""
        device = self.gpu.device
        self.gpu.submit(x, ids, weights)
        self.gpu.wait()
        seconds = []
        for experts in (self.cpu, self.gpu):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            experts.submit(x, ids, weights)
            experts.wait()
            torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        if self.crossover.threshold is None:
            self.crossover.record(x.shape[0], *seconds)
        if self.split:
            assert self.crossover.split is not None
            self.crossover.split.calibrate(self._counts(ids), *seconds)
        return self.crossover.threshold

    def _split_rates_missing(self) -> bool:
        return self.crossover.split is None or self.crossover.split.rates is None

    def _counts(self, ids: torch.Tensor) -> torch.Tensor:
        """[E] tokens routed to each expert, on the host (one sync)."""
        flat = ids.flatten()
        return torch.bincount(flat[flat >= 0], minlength=self.gpu.n_expert).cpu()

    def _submit_split(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> bool:
        """Start the CPU's share, then enqueue the GPU's; False (nothing started) when the plan gives the CPU
        nothing."""
        assert self.crossover.split is not None
        counts = self._counts(ids)
        cpu_mask = self.crossover.split.plan(counts)
        if not bool(cpu_mask.any()):
            return False
        on_cpu = cpu_mask.to(ids.device)[ids.clamp(min=0)] & (ids >= 0)  # [T, k]
        # The CPU gets only the tokens its experts take: its copies, quantization and output scale with its
        # share, not with the batch.
        cpu_rows = on_cpu.any(dim=1).nonzero().flatten()
        cpu_start = time.perf_counter()
        self.cpu.submit(x[cpu_rows], torch.where(on_cpu, ids, -1)[cpu_rows], weights[cpu_rows])  # syncs the idle stream
        stream = torch.cuda.current_stream(self.gpu.device)
        gpu_start, gpu_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gpu_start.record(stream)
        self.gpu.submit(x, torch.where(on_cpu, -1, ids), weights)
        gpu_end.record(stream)
        self._split_call = _SplitCall(counts, cpu_mask, cpu_rows, cpu_start, gpu_start, gpu_end)
        return True

    def _wait_split(self) -> torch.Tensor:
        call, self._split_call = self._split_call, None
        assert call is not None
        cpu_out = self.cpu.wait()  # blocks until the native side is done: its time, unless it beat this call
        cpu_seconds = time.perf_counter() - call.cpu_start
        out = self.gpu.wait()
        call.gpu_end.synchronize()  # one host sync per long call, so the split rates follow what happened
        gpu_seconds = call.gpu_start.elapsed_time(call.gpu_end) / 1e3
        assert self.crossover.split is not None
        self.crossover.split.record(call.counts, call.cpu_mask, cpu_seconds, gpu_seconds)
        active = call.counts > 0
        cpu_experts = int((active & call.cpu_mask).sum())
        self.last_split = SplitReport(cpu_experts, int(active.sum()) - cpu_experts, call.cpu_rows.numel(), cpu_seconds,
                                      gpu_seconds)
        logger.debug("split call: %s", self.last_split)
        return out.index_add_(0, call.cpu_rows, cpu_out)
