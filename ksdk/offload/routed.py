"""Routed experts on the CPU's native kernels for a model on any device.

``submit()`` starts the experts and returns; the caller computes something else (the shared expert) and
then ``wait()`` hands back the routed output on the model's device. For a model on the GPU the inputs
cross through pinned host buffers, reused across steps. Inside a captured decode step ``enqueue()`` runs the
same experts as a host node instead (``ksdk.offload.host_call``): no host sync, no Python per step.

``HybridRoutedExperts`` (in ``ksdk.offload.hybrid``, importable from here too) picks per call between those
and the experts streamed to the GPU (``ksdk.offload.gpu_experts``): long prompts are compute-bound on the CPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ksdk.offload.cpu_experts import CPUExperts
from ksdk.offload.hybrid import HybridRoutedExperts

if TYPE_CHECKING:
    from ksdk.offload.host_call import DoorbellServer, ExpertHostCall

__all__ = ["HybridRoutedExperts", "NativeRoutedExperts"]

logger = logging.getLogger(__name__)


class NativeRoutedExperts:
    def __init__(self, experts: CPUExperts, device: torch.device) -> None:
        self.experts, self.device = experts, device
        self._buffers: dict[str, torch.Tensor] = {}
        self._out: torch.Tensor | None = None
        # (tokens, k, x dtype, id(log), id(server)) -> buffers and native call; never replaced: captured graphs
        # point at them
        self._host_calls: dict[tuple[int, int, torch.dtype, int, int], ExpertHostCall] = {}

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

    def enqueue(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, log: object,
                server: DoorbellServer | None = None, resident_slots: torch.Tensor | None = None) -> ExpertHostCall:
        """The routed experts as stream-ordered work on the current CUDA stream (capturable: x, ids and weights
        staged into fixed pinned buffers, the native experts run through ``server``'s doorbell or, without
        one, as a driver host node); the returned call's ``output()`` reads the result. Errors go to ``log``
        (a native HostCallLog). The buffers of each batch size are kept for the graphs that use them.
        ``resident_slots``: the experts held on the GPU (``ResidentExperts.slots``), which the host skips."""
        from ksdk.offload.host_call import ExpertHostCall

        x_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        key = (x.shape[0], ids.shape[1], x_dtype, id(log), id(server))  # entries keep both alive: ids stay unique
        call = self._host_calls.get(key)
        if call is None:
            assert not torch.cuda.is_current_stream_capturing(), "pinned buffers are allocated before capture"
            call = self._host_calls[key] = ExpertHostCall(self.experts, log, x.shape[0], ids.shape[1], x_dtype,
                                                          self.device, server)
        call.enqueue(x, ids, weights, resident_slots)
        return call
