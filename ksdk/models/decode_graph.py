"""The whole decode step as one CUDA graph: from the hidden states after the embedding to the logits.

One graph per batch size (up to GRAPH_MAX_BATCH) and length bucket, captured lazily at the first step of
that shape; all share one memory pool. The routed experts run inside the graph as host work
(``ksdk.offload.host_call``: a native server thread answering doorbells, or the driver's host nodes), so a
replay is a few copies into static buffers plus ``graph.replay()``: no Python and no host sync per layer.
The step ends with one host wait, after which the native log is read for errors the experts raised on the
server's thread. That wait blocks (a blocking-sync event) rather than spinning as a plain stream sync does:
a spinning host thread takes a core from the expert workers for the whole step, and one descheduled worker
stalls every phase barrier of every layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ksdk.errors import InvalidRequestError
from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.layers.mla import GRAPH_MAX_BATCH, GRAPH_POOL, copy_page_table, length_bucket
from ksdk.layers.moe import MoE, MoEStepContext
from ksdk.offload.host_call import HOST_CALL_MODES, DoorbellServer, raise_if_failed
from ksdk.offload.native import load_native

if TYPE_CHECKING:
    from ksdk.models.deepseek import DeepseekForCausalLM

__all__ = ["DecodeGraphs"]


@contextlib.contextmanager
def _serving(server: DoorbellServer | None, num_calls: int) -> Iterator[None]:
    """Arms the doorbell server (if any) for a step's host calls while the block launches the step and waits
    for it; then checks that every call was served. A failing block's error is the one raised."""
    if server is None:
        yield
        return
    server.arm(num_calls)
    try:
        yield
    except BaseException:
        with contextlib.suppress(RuntimeError):
            server.finish()
        raise
    server.finish()


class _CapturedStep:
    """One decode step of B sequences within one length bucket, captured. Inputs are copied into static
    buffers before each replay; ``logits`` is a static buffer the next replay overwrites."""

    def __init__(self, model: DeepseekForCausalLM, x: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, kv_cache: list[torch.Tensor], bucket: int, ctx: MoEStepContext,
                 num_host_calls: int) -> None:
        B = x.shape[0]
        self.x, self.positions = x.clone(), positions.clone()  # [B, hidden], [B]
        page_table = meta.page_table.new_zeros(B, -(-bucket // meta.page_size))  # as wide as the bucket needs
        copy_page_table(page_table, meta.page_table)
        self.meta = dataclasses.replace(meta, query_start_loc=meta.query_start_loc.clone(),
                                        seq_lens=meta.seq_lens.clone(), page_table=page_table,
                                        slot_mapping=meta.slot_mapping.clone())

        def run() -> torch.Tensor:
            return model.decode_step(self.x, self.positions, self.meta, kv_cache, bucket, ctx)

        # Warm-up outside the capture (Triton compiles, cuBLAS workspace, the experts' pinned buffers). It runs
        # the step for real, host calls included; writing this step's cache slots twice is harmless.
        device = x.device
        warm = torch.cuda.Stream(device)
        warm.wait_stream(torch.cuda.current_stream(device))
        with _serving(ctx.server, num_host_calls):
            with torch.cuda.stream(warm):
                run()
            torch.cuda.current_stream(device).wait_stream(warm)
            torch.cuda.synchronize(device)
        raise_if_failed(ctx.log)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=GRAPH_POOL.handle):
            self.logits = run()  # [B, vocab] fp32

    def replay(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.x.copy_(x)
        self.positions.copy_(positions)
        self.meta.seq_lens.copy_(meta.seq_lens)
        copy_page_table(self.meta.page_table, meta.page_table)
        self.meta.slot_mapping.copy_(meta.slot_mapping)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """A model's captured decode steps for one KV cache, keyed by batch size and length bucket.

    The graphs bind the pages of one KV cache (the list object the engine passes every step, held here):
    a step with another list drops them, so memory stays bounded when callers build caches per call. They
    also bind the routed experts present at capture: after swapping a layer's experts call :meth:`clear`.
    ``log`` (a native HostCallLog) counts the host calls and the time spent in them.
    """

    def __init__(self, model: DeepseekForCausalLM) -> None:
        self.model = model
        self._log: object | None = None
        self._host_calls = "doorbell"
        self._ctx: MoEStepContext | None = None
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}  # (batch, bucket)
        self._kv_cache: list[torch.Tensor] | None = None  # the cache the graphs read and write
        self._capturable: bool | None = None
        self._done: torch.cuda.Event | None = None  # blocking-sync: the host sleeps while the step runs

    @property
    def log(self) -> object:
        """The native HostCallLog of every host call in these graphs: ``calls``, ``expert_ns``, the spans
        between a step's host calls (``gap_ns``, ``gaps``) and before its first (``lead_ns``), ``skip_experts``."""
        if self._log is None:
            self._log = load_native().HostCallLog()
        return self._log

    @property
    def host_calls(self) -> str:
        """How the graphs run the routed experts (``ksdk.offload.host_call``): "doorbell" (default: a native
        server thread polls pinned memory the step writes) or "driver" (host nodes on the driver's thread).
        Setting it drops the captured steps."""
        return self._host_calls

    @host_calls.setter
    def host_calls(self, mode: str) -> None:
        if mode not in HOST_CALL_MODES:
            raise InvalidRequestError(f"host_calls={mode!r}; allowed: {', '.join(HOST_CALL_MODES)}")
        if mode != self._host_calls:
            self.clear()
            self._ctx = None
            self._host_calls = mode

    def _num_host_calls(self) -> int:
        return sum(isinstance(layer.ffn, MoE) for layer in self.model.layers)

    @property
    def capturable(self) -> bool:
        """Whether every MoE layer's routed experts can run as a host node (native ones can, torch ones not)."""
        if self._capturable is None:
            moes = [layer.ffn for layer in self.model.layers if isinstance(layer.ffn, MoE)]
            self._capturable = self.model.device.type == "cuda" and all(m.host_experts() is not None for m in moes)
        return self._capturable

    def serves(self, meta: AttentionMetadata) -> bool:
        """A decode batch (one new token per sequence) of at most GRAPH_MAX_BATCH sequences, on a model that
        can be captured; mixed and prefill batches stay eager."""
        return meta.num_seqs <= GRAPH_MAX_BATCH and meta.is_decode and self.capturable

    def clear(self) -> None:
        """Drop every captured step (their memory returns to the shared pool)."""
        self._graphs.clear()
        self._kv_cache = None
        self._capturable = None

    def run(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """x [B, hidden] after the embedding, positions [B] -> [B, vocab] fp32 logits (a fresh tensor)."""
        bucket = length_bucket(max(meta.seq_lens_host))
        if kv_cache is not self._kv_cache:
            self.clear()
            self._kv_cache = kv_cache
        key = (x.shape[0], bucket)
        step = self._graphs.get(key)
        if step is None:
            if self._ctx is None:
                server = DoorbellServer() if self._host_calls == "doorbell" else None
                self._ctx = MoEStepContext(self.log, torch.cuda.Stream(x.device), server)
            step = self._graphs[key] = _CapturedStep(self.model, x, positions, meta, kv_cache, bucket, self._ctx,
                                                     self._num_host_calls())
        self.log.new_step()  # type: ignore[attr-defined]
        logits = step.replay(x, positions, meta)
        with _serving(self._ctx.server, self._num_host_calls()):  # armed after the launch: no doorbell yet
            logits = logits.clone()  # the static buffer is overwritten by the next replay
            if self._done is None:
                self._done = torch.cuda.Event(blocking=True)
            self._done.record(torch.cuda.current_stream(x.device))
            self._done.synchronize()  # the host calls have run: their errors are final
        raise_if_failed(self.log)
        return logits
