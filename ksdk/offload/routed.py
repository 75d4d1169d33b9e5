"""Routed experts on the CPU's native kernels for a model on any device.

``submit()`` starts the experts and returns; the caller computes something else (the shared expert) and
then ``wait()`` hands back the routed output on the model's device. For a model on the GPU the inputs
cross through pinned host buffers, reused across steps.

``HybridRoutedExperts`` picks per call between those and the experts streamed to the GPU
(``ksdk.offload.gpu_experts``), by the number of tokens: long prompts are compute-bound on the CPU.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

import torch

from ksdk.offload.cpu_experts import CPUExperts

if TYPE_CHECKING:  # imported lazily by the caller: it loads the Triton kernels
    from ksdk.offload.gpu_experts import GPUStreamedExperts, StreamCrossover

__all__ = ["HybridRoutedExperts", "NativeRoutedExperts"]

logger = logging.getLogger(__name__)


class NativeRoutedExperts:
    def __init__(self, experts: CPUExperts, device: torch.device) -> None:
        self.experts, self.device = experts, device
        self._buffers: dict[str, torch.Tensor] = {}
        self._out: torch.Tensor | None = None

    def _host(self, key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer of ``like``'s shape (pinned when the model is on a GPU), grown as batches grow."""
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.shape[0] < like.shape[0] or buf.shape[1:] != like.shape[1:]:
            buf = torch.empty(like.shape, dtype=dtype, pin_memory=self.device.type == "cuda")
            self._buffers[key] = buf
        return buf[: like.shape[0]]

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        x_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32  # what the kernels read
        out = self._host("out", x, torch.float32)
        if self.device.type == "cpu":
            self.experts.submit(x.to(x_dtype), ids, weights.float(), out)
        else:
            x_host = self._host("x", x, x_dtype)
            ids_host = self._host("ids", ids, torch.int32)
            w_host = self._host("weights", weights, torch.float32)
            x_host.copy_(x, non_blocking=True)
            ids_host.copy_(ids, non_blocking=True)
            w_host.copy_(weights, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the copies have landed
            self.experts.submit(x_host, ids_host, w_host, out)
        self._out = out

    def wait(self) -> torch.Tensor:
        """[T, hidden] fp32 routed output on the model's device."""
        assert self._out is not None, "wait() without submit()"
        self.experts.wait()
        out, self._out = self._out, None
        return out if self.device.type == "cpu" else out.to(self.device, non_blocking=True)


class HybridRoutedExperts:
    """Native CPU experts for short batches, experts streamed to the GPU from ``crossover``'s threshold on.

    Until the crossover is known (measured at the first call of at least ``crossover.min_tokens`` tokens,
    or by :meth:`calibrate`) every call runs on the CPU. ``last_path`` says where the last call ran.
    """

    def __init__(self, cpu: NativeRoutedExperts, gpu: GPUStreamedExperts, crossover: StreamCrossover) -> None:
        self.cpu, self.gpu, self.crossover = cpu, gpu, crossover
        self.last_path: Literal["cpu", "gpu"] | None = None
        self._active: NativeRoutedExperts | GPUStreamedExperts | None = None

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        num_tokens = x.shape[0]
        if self.crossover.needs_measuring(num_tokens):
            self.calibrate(x, ids, weights)
        use_gpu = self.crossover.use_gpu(num_tokens)
        self._active, self.last_path = (self.gpu, "gpu") if use_gpu else (self.cpu, "cpu")
        self._active.submit(x, ids, weights)

    def wait(self) -> torch.Tensor:
        """[T, hidden] fp32 routed output on the model's device."""
        assert self._active is not None, "wait() without submit()"
        active, self._active = self._active, None
        return active.wait()

    def calibrate(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> int:
        """Time one CPU and one GPU call on this batch (after an untimed GPU call that compiles the kernels
        and allocates the staging slots), set the crossover's threshold from them and return it."""
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
        return self.crossover.record(x.shape[0], *seconds)
