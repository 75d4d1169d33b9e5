"""Mixture of experts: router, shared experts, and the routed experts' dispatch.

Routed experts stay in their GGUF form (memmapped): the torch path dequantizes only the experts a batch
touches (with a small cache); the native path (ksdk.offload) computes on the quantized blocks directly.
In a captured decode step (:meth:`MoE.decode_step`) the native experts run as a host node of the graph
while the shared expert runs on a side stream. On a GPU, some routed experts may live in GPU memory
(``ksdk.offload.resident``): the GPU computes those, beside the shared expert, and the rest never see them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Protocol

import torch

from ksdk.layers.linear import MLP

if TYPE_CHECKING:
    from ksdk.models.config import ModelConfig
    from ksdk.offload.gpu_experts import ExpertStaging, StreamCrossover
    from ksdk.offload.host_call import DoorbellServer
    from ksdk.offload.options import ExpertOptions
    from ksdk.offload.resident import ResidentExperts
    from ksdk.offload.routed import NativeRoutedExperts
    from ksdk.weights.gguf_file import TensorView

__all__ = ["MoE", "MoEStepContext", "Router", "RoutedExperts", "TorchExperts", "build_routed_experts",
           "gpu_streaming"]


class Router(torch.nn.Module):
    """Top-k expert choice. V3/R1: sigmoid scores chosen with a bias, group-limited by each group's top-2
    sum. V2: softmax scores, greedy or group-limited by each group's best score."""

    def __init__(self, config: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_groups, self.topk_groups = config.num_groups, config.topk_groups
        self.gating = config.gating
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.register_buffer("weight", weight.float(), persistent=False)  # [E, hidden]
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)  # [E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, k] int64, weights [T, k] fp32)."""
        logits = torch.nn.functional.linear(x.float(), self.weight)  # [T, E]
        if logits.is_cuda:  # the rest in one launch instead of about fifteen (ties: see ksdk.kernels.router)
            from ksdk.kernels.router import route

            return route(logits, self.bias, top_k=self.top_k, num_groups=self.num_groups,
                         topk_groups=self.topk_groups, sigmoid=self.gating == "sigmoid",
                         normalize=self.norm_topk_prob, scaling=self.scaling)
        scores = logits.sigmoid() if self.gating == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias
        if self.num_groups > 1 and self.topk_groups < self.num_groups:
            grouped = choice.view(x.shape[0], self.num_groups, -1)  # [T, G, E/G]
            if self.gating == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices, True)
            fill = float("-inf") if self.gating == "sigmoid" else 0.0
            choice = grouped.masked_fill(~keep[..., None], fill).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [T, k]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class RoutedExperts(Protocol):
    """Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) for every token t, started by submit() and collected by wait(),
    so that the shared expert can run in between (on the GPU while the CPU computes the routed ones)."""

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None: ...

    def wait(self) -> torch.Tensor: ...


class TorchExperts:
    """Routed experts in plain torch: dequantize the touched experts (an LRU cache keeps recent ones)."""

    def __init__(self, gate: TensorView, up: TensorView, down: TensorView, device: torch.device,
                 dtype: torch.dtype, cache_bytes: int = 256 << 20) -> None:
        self.gate, self.up, self.down = gate, up, down
        self.device, self.dtype = device, dtype
        expert_bytes = 3 * gate.shape[1] * gate.shape[2] * torch.finfo(dtype).bits // 8
        self.cache_size = max(1, cache_bytes // expert_bytes)
        self._cache: collections.OrderedDict[int, tuple[torch.Tensor, ...]] = collections.OrderedDict()
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]  # type: ignore[return-value]
        w = tuple(v[e].dequantize(torch.float32).to(self.device, self.dtype) for v in (self.gate, self.up, self.down))
        self._cache[e] = w
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return w  # type: ignore[return-value]

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self._pending = (x, ids, weights)  # computed in wait(): torch has no background worker here

    def wait(self) -> torch.Tensor:
        assert self._pending is not None, "wait() without submit()"
        (x, ids, weights), self._pending = self._pending, None
        return self.forward(x, ids, weights)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert
        experts, counts = flat_ids[order].unique_consecutive(return_counts=True)
        flat_weights = weights.flatten()
        for e, pairs in zip(experts.tolist(), order.split(counts.tolist())):
            if e < 0:  # slots another side computes (experts resident on the GPU)
                continue
            gate, up, down = self._expert(e)
            rows = pairs // ids.shape[1]
            h = x[rows]
            y = torch.nn.functional.silu(h @ gate.T) * (h @ up.T)
            out.index_add_(0, rows, (y @ down.T) * flat_weights[pairs, None].to(x.dtype))
        return out


@dataclasses.dataclass(frozen=True)
class MoEStepContext:
    """What every MoE layer of a captured decode step shares: the native log its host calls report to
    (errors, time in experts), the side stream its shared expert forks onto, and the doorbell server that
    runs its host calls (None: the driver's host nodes run them)."""

    log: object  # ksdk._native.HostCallLog
    side_stream: torch.cuda.Stream
    server: DoorbellServer | None = None


class MoE(torch.nn.Module):
    """Output = Σ w·expert(x) + shared(x). ``resident``: routed experts held on the GPU, which ``experts`` then
    never computes (their ids reach it as -1)."""

    def __init__(self, router: Router, experts: RoutedExperts, shared: MLP | None,
                 resident: ResidentExperts | None = None) -> None:
        super().__init__()
        self.router, self.experts, self.shared, self.resident = router, experts, shared, resident

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.router(x)
        resident = self.resident
        self.experts.submit(x, ids if resident is None else resident.host_ids(ids), weights)
        shared = self.shared(x) if self.shared is not None else None  # overlaps the routed experts
        on_gpu = resident.forward(x, ids, weights) if resident is not None else None  # and so do these
        routed = self.experts.wait()
        out = (routed if on_gpu is None else routed + on_gpu).to(x.dtype)
        return out if shared is None else out + shared

    def host_experts(self) -> NativeRoutedExperts | None:
        """The native CPU experts a captured step can run as a host node (a hybrid's CPU part: decode batches
        are far below the GPU-streaming threshold), or None when the routed experts are not native."""
        from ksdk.offload.routed import NativeRoutedExperts

        experts = getattr(self.experts, "cpu", self.experts)
        return experts if isinstance(experts, NativeRoutedExperts) else None

    def decode_step(self, x: torch.Tensor, ctx: MoEStepContext) -> torch.Tensor:
        """forward() as stream-ordered work only (capturable): the routed experts as host work on the
        current stream (``ksdk.offload.host_call``), the shared expert forked onto ``ctx.side_stream``
        meanwhile. Same numerics."""
        experts = self.host_experts()
        assert experts is not None, "decode_step needs native routed experts"
        main = torch.cuda.current_stream(x.device)
        shared = on_gpu = None
        if self.shared is not None:
            ctx.side_stream.wait_stream(main)  # fork: the shared expert overlaps the router and the CPU experts
            with torch.cuda.stream(ctx.side_stream):
                shared = self.shared(x)
        ids, weights = self.router(x)
        resident = self.resident
        if resident is not None:
            ctx.side_stream.wait_stream(main)  # the router's choice; the resident experts overlap the CPU's too
            with torch.cuda.stream(ctx.side_stream):
                on_gpu = resident.forward(x, ids, weights)
        call = experts.enqueue(x, ids, weights, ctx.log, ctx.server,
                               resident_slots=None if resident is None else resident.slots)
        if shared is not None or on_gpu is not None:
            main.wait_stream(ctx.side_stream)  # join
        return call.output(x.dtype, shared, on_gpu)  # (routed + on_gpu).to(x.dtype) + shared, in one launch


def gpu_streaming(device: torch.device, options: ExpertOptions) -> tuple[ExpertStaging, StreamCrossover] | None:
    """One staging area and one crossover shared by all MoE layers (they run one at a time), or None."""
    if device.type != "cuda" or options.gpu_stream_threshold == 0:
        return None
    from ksdk.offload.gpu_experts import ExpertStaging, StreamCrossover
    from ksdk.offload.host_call import DoorbellServer

    return ExpertStaging(device), StreamCrossover(options.gpu_stream_threshold)


def build_routed_experts(views: list[TensorView], device: torch.device, dtype: torch.dtype, options: ExpertOptions,
                    streaming: tuple[ExpertStaging, StreamCrossover] | None = None) -> RoutedExperts:
    backend = options.backend
    if backend == "auto":
        from ksdk.offload.cpu_experts import SUPPORTED_QTYPES as NATIVE_QTYPES
        from ksdk.offload.native import native_available

        backend = "native" if native_available() and all(v.qtype in NATIVE_QTYPES for v in views) else "torch"
    if backend == "torch":
        return TorchExperts(*views, device=device, dtype=dtype)
    from ksdk.offload.cpu_experts import CPUExperts
    from ksdk.offload.routed import NativeRoutedExperts

    experts = CPUExperts(*views, num_threads=options.threads, copy_to_ram=options.memory != "mmap",
                         lock_memory=options.memory == "locked")
    native = NativeRoutedExperts(experts, device)
    if streaming is None:
        return native
    from ksdk.kernels.dequant_matmul import KERNEL_QTYPES
    from ksdk.offload.gpu_experts import GPUStreamedExperts
    from ksdk.offload.routed import HybridRoutedExperts

    if not all(v.qtype in KERNEL_QTYPES for v in views):  # e.g. BF16 experts: the CPU has kernels, the GPU not
        return native
    staging, crossover = streaming
    return HybridRoutedExperts(native, GPUStreamedExperts(*views, staging=staging), crossover)
