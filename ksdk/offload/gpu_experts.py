"""Routed experts streamed to the GPU over PCIe and multiplied there on their GGUF blocks.

For long prompts the CPU's native experts are compute-bound (an R1 MoE layer: ~750 ms at 1024 tokens on a
16-core host), while the layer's 7.3 GB of experts cross PCIe in ~135 ms and the GPU multiplies them with
``ksdk.kernels.dequant_matmul``. ``GPUStreamedExperts`` does that for one layer, expert after expert:

    memmap --(host copy, torch threads)--> pinned slot s --(side stream)--> device slot s --> gate/up, SiLU·up, down
    registered process memory ------------(side stream, DMA)-------------> device slot s --> ...

with ``ExpertStaging``'s slots used in turn, so expert e+1's copies overlap expert e's compute. The second
line is taken when the experts live in process memory that is registered with CUDA
(:meth:`GPUStreamedExperts.use_host_memory`): no host copy, and the host never waits. One staging area serves
every layer of a model (layers run one at a time). ``StreamCrossover`` holds the token count
from which this beats the CPU: given, or measured once (see ``HybridRoutedExperts`` in ``hybrid.py``).

An expert's bytes take ~0.6 ms to cross PCIe, so the host's work per expert must stay well below that: the
batch is routed once (``RoutePlan``: one host sync), tokens are gathered and weighted once per chunk of experts
rather than per expert, and the copies go straight to the driver. Per expert the host then issues three copies
and five kernels (gate/up, SiLU, ·up, down, the add into the output).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from gguf.constants import GGMLQuantizationType

from ksdk.errors import ModelFileError, UnsupportedQuantError
from ksdk.kernels.dequant_matmul import KERNEL_QTYPES, dequant_matmul
from ksdk.offload.host_call import cuda_driver
from ksdk.weights.quants import bytes_per_row

if TYPE_CHECKING:
    from ksdk.offload.cpu_experts import ExpertTensorView
    from ksdk.offload.expert_split import ExpertSplit
    from ksdk.offload.host_memory import ExpertHostMemory

__all__ = ["CALIBRATION_TOKENS", "ExpertLayout", "ExpertStaging", "GPUStreamedExperts", "RoutePlan", "StreamCrossover",
           "accumulate_experts", "expert_mlp", "route_plan"]

logger = logging.getLogger(__name__)

# Batches this large touch nearly every expert (R1: 256 tokens x 8 of 256 experts leave ~0.1 untouched), so
# the GPU's cost measured there is its full-transfer cost, the part that does not shrink with more tokens.
CALIBRATION_TOKENS = 256
# Pairs (token, expert) gathered at once: bounds the gathered inputs and outputs ([pairs, hidden] each, ~117 MB
# in bf16 for R1) while an 8K-token prompt (64K pairs) still takes only 8 gathers and 8 index_adds per layer.
CHUNK_PAIRS = 8192


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Where one expert's gate, up and down rows lie in a flat byte buffer (in that order, back to back)."""

    hidden: int
    intermediate: int
    qtypes: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType]  # gate, up, down

    @classmethod
    def from_views(cls, gate: ExpertTensorView, up: ExpertTensorView, down: ExpertTensorView) -> ExpertLayout:
        """Raises UnsupportedQuantError for a type without a GPU kernel, ModelFileError for mismatched shapes."""
        for view in (gate, up, down):
            if view.qtype not in KERNEL_QTYPES:
                raise UnsupportedQuantError(str(getattr(view, "name", "expert tensor")),
                                            GGMLQuantizationType(view.qtype).name, [q.name for q in KERNEL_QTYPES])
        n_expert, intermediate, hidden = (int(d) for d in gate.shape)
        for view, shape in ((up, (n_expert, intermediate, hidden)), (down, (n_expert, hidden, intermediate))):
            if tuple(view.shape) != shape:
                raise ModelFileError(f"expert tensor {getattr(view, 'name', '?')!r} has shape {tuple(view.shape)}; "
                                     f"expected {shape} to match the gate's {tuple(gate.shape)}")
        return cls(hidden, intermediate, (GGMLQuantizationType(gate.qtype), GGMLQuantizationType(up.qtype),
                                          GGMLQuantizationType(down.qtype)))

    @property
    def row_bytes(self) -> tuple[int, int, int]:
        gate, up, down = self.qtypes
        return (bytes_per_row(gate, self.hidden), bytes_per_row(up, self.hidden),
                bytes_per_row(down, self.intermediate))

    @property
    def part_bytes(self) -> tuple[int, int, int]:
        g, u, d = self.row_bytes
        return self.intermediate * g, self.intermediate * u, self.hidden * d

    @property
    def nbytes(self) -> int:
        return sum(self.part_bytes)


def expert_mlp(h: torch.Tensor, buf: torch.Tensor, layout: ExpertLayout, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(gate·h) ⊙ up·h) for h [n, hidden], the expert's bytes ``buf`` uint8 [layout.nbytes] on h's
    device -> [n, hidden] in h's dtype (written into ``out`` when given)."""
    H, I = layout.hidden, layout.intermediate
    (q_gate, q_up, q_down), (r_gate, r_up, r_down) = layout.qtypes, layout.row_bytes
    gate_bytes, up_bytes, _ = layout.part_bytes
    if q_gate == q_up:  # gate and up rows lie back to back: one launch for both
        gate_up = dequant_matmul(h, buf[: gate_bytes + up_bytes].view(2 * I, r_gate), q_gate, H)  # [n, 2I]
        gate, up = gate_up[:, :I], gate_up[:, I:]
    else:
        gate = dequant_matmul(h, buf[:gate_bytes].view(I, r_gate), q_gate, H)
        up = dequant_matmul(h, buf[gate_bytes : gate_bytes + up_bytes].view(I, r_up), q_up, H)
    act = torch.nn.functional.silu(gate).mul_(up)  # [n, I], contiguous
    return dequant_matmul(act, buf[gate_bytes + up_bytes :].view(H, r_down), q_down, I, out=out)


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """A batch's (token, slot) pairs grouped by expert, experts ascending, slots of id -1 left out.

    ``tokens`` [P] int64 and ``weights`` [P] fp32 (on the batch's device) list the pairs expert after expert:
    ``experts[i]`` owns pairs ``starts[i] : starts[i] + counts[i]``.
    """

    experts: list[int]
    counts: list[int]
    tokens: torch.Tensor
    weights: torch.Tensor

    @property
    def starts(self) -> list[int]:
        return [0, *itertools.accumulate(self.counts)][:-1]

    def chunks(self, max_pairs: int) -> list[tuple[int, int]]:
        """Runs of consecutive experts [first, last) holding at most ``max_pairs`` pairs (or one expert)."""
        runs, first, pairs = [], 0, 0
        for i, n in enumerate(self.counts):
            if pairs and pairs + n > max_pairs:
                runs.append((first, i))
                first, pairs = i, 0
            pairs += n
        if self.counts:
            runs.append((first, len(self.counts)))
        return runs


def route_plan(ids: torch.Tensor, weights: torch.Tensor) -> RoutePlan:
    """Group the pairs of ``ids`` [T, k] (-1: the slot runs elsewhere) and ``weights`` [T, k] by expert.
    One device-to-host sync (the experts and their counts)."""
    flat_ids = ids.flatten()
    order = flat_ids.argsort(stable=True)  # (token, slot) pairs grouped by expert, the -1 slots first
    experts, counts = flat_ids[order].unique_consecutive(return_counts=True)
    experts_host, counts_host = torch.stack((experts, counts)).tolist()
    skip = counts_host[0] if experts_host and experts_host[0] < 0 else 0
    if skip:
        experts_host, counts_host = experts_host[1:], counts_host[1:]
    order = order[skip:]
    return RoutePlan(experts_host, counts_host, order // ids.shape[1], weights.flatten().float()[order])


def accumulate_experts(out: torch.Tensor, x: torch.Tensor, plan: RoutePlan, first: int, last: int,
                       expert_bytes: Callable[[int], torch.Tensor], layout: ExpertLayout) -> None:
    """out[t] += Σ w · expert(x[t]) over the pairs of experts ``first:last`` of ``plan``: out [T, hidden] fp32,
    x [T, hidden]; ``expert_bytes(e)`` gives expert e's bytes on the device (and may stage them), and is
    called in order, once per expert, after the previous expert's kernels were enqueued."""
    starts = plan.starts
    lo = starts[first]
    hi = starts[last - 1] + plan.counts[last - 1]
    tokens = plan.tokens[lo:hi]
    xs = x[tokens]  # [pairs, hidden]: each expert's rows are a contiguous slice
    ys = torch.empty_like(xs)
    spans = [(starts[i] - lo, starts[i] - lo + plan.counts[i]) for i in range(first, last)]
    for i, (a, b) in zip(range(first, last), spans):
        expert_mlp(xs[a:b], expert_bytes(plan.experts[i]), layout, out=ys[a:b])
    weighted = ys.float().mul_(plan.weights[lo:hi, None])
    # One index_add per expert: its tokens are distinct, so no two atomic adds meet and the sums come out in
    # expert order, the same bits every run (one add for the chunk would race a token's k slots).
    for a, b in spans:
        out.index_add_(0, tokens[a:b], weighted[a:b])


class ExpertStaging:
    """Pinned host slots and device slots that experts pass through on their way to the GPU.

    ``stage()`` fills the next slot and makes the current stream wait for its copy; ``release()`` marks the
    slot's device bytes read once the expert's kernels are enqueued. A slot is reused only after its previous
    host-to-device copy finished (host side) and the kernels that read it finished (copy stream side), so
    with two slots expert e+1's copies overlap expert e's compute. Parts that are already page-locked
    (``pinned=True``) skip the host slot: the copy stream reads them directly and the host never waits.
    Buffers are allocated at first use and grow to the largest expert asked for.
    """

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        if device.type != "cuda" or slots < 1:
            raise ValueError(f"ExpertStaging needs a CUDA device and >= 1 slot; got {device}, slots={slots}")
        self.device, self.slots = device, slots
        self._host: list[torch.Tensor] = []  # pinned uint8 [slot_bytes] each
        self._dev: list[torch.Tensor] = []
        self._copied = [torch.cuda.Event() for _ in range(slots)]  # host -> device copy of the slot done
        self._read = [torch.cuda.Event() for _ in range(slots)]  # kernels reading the device slot done
        self._stream: torch.cuda.Stream | None = None
        self._next = 0

    @property
    def slot_bytes(self) -> int:
        return self._dev[0].numel() if self._dev else 0

    def _reserve(self, nbytes: int, host: bool) -> None:
        if nbytes > self.slot_bytes:
            torch.cuda.synchronize(self.device)  # the old slots may still be in flight
            self._host = []
            self._dev = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
            self._stream = self._stream or torch.cuda.Stream(self.device)
            logger.debug("expert staging: %d device slots of %.1f MB on %s", self.slots, nbytes / 1e6, self.device)
        if host and not self._host:  # only the staged path needs pinned bounce buffers
            self._host = [torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(self.slots)]

    def stage(self, parts: list[torch.Tensor], *, pinned: bool = False) -> tuple[torch.Tensor, int]:
        """Copy host byte tensors ``parts`` back to back into the next slot -> (device bytes, slot).

        ``pinned``: the parts are page-locked (registered) memory, copied to the device slot directly."""
        nbytes = sum(p.numel() for p in parts)
        self._reserve(nbytes, host=not pinned)
        slot, self._next = self._next, (self._next + 1) % self.slots
        dev = self._dev[slot]
        if not pinned:
            host = self._host[slot]
            self._copied[slot].synchronize()  # the pinned bytes of this slot's last expert have left
            offset = 0
            for part in parts:  # torch's copy uses its intra-op threads: the memmap read is the slow side
                host[offset : offset + part.numel()].copy_(part.reshape(-1))
                offset += part.numel()
            parts = [host[:nbytes]]
        compute = torch.cuda.current_stream(self.device)
        stream = self._stream
        assert stream is not None
        stream.wait_event(self._read[slot])
        driver, offset = cuda_driver(), 0
        for part in parts:  # page-locked and contiguous: straight to the driver, no torch dispatch per copy
            assert part.is_contiguous()
            driver.copy_to_device(dev.data_ptr() + offset, part.data_ptr(), part.numel(), stream.cuda_stream)
            offset += part.numel()
        self._copied[slot].record(stream)
        compute.wait_event(self._copied[slot])
        return dev[:nbytes], slot

    def release(self, slot: int) -> None:
        """The kernels reading ``slot`` are enqueued on the current stream: its next copy waits for them."""
        self._read[slot].record(torch.cuda.current_stream(self.device))


class GPUStreamedExperts:
    """One layer's routed experts, copied to the GPU per call and computed there (``RoutedExperts`` protocol).

    Args:
        gate, up: views of ``ffn_gate_exps`` / ``ffn_up_exps`` (E, I, H); down: ``ffn_down_exps`` (E, H, I),
            each of a type in ``KERNEL_QTYPES``.
        staging: the model's shared :class:`ExpertStaging`.

    ``direct`` says whether the bytes are copied straight from registered memory (see :meth:`use_host_memory`).
    """

    def __init__(self, gate: ExpertTensorView, up: ExpertTensorView, down: ExpertTensorView,
                 staging: ExpertStaging) -> None:
        self.layout = ExpertLayout.from_views(gate, up, down)
        self.staging, self.device = staging, staging.device
        with warnings.catch_warnings():  # the file mapping is read-only, and we only ever read it
            warnings.simplefilter("ignore", UserWarning)
            self._raw = [torch.from_numpy(v.raw) for v in (gate, up, down)]  # [E, rows, row_bytes] uint8, zero-copy
        self._host_memory: ExpertHostMemory | None = None
        self.direct = False
        self._out: torch.Tensor | None = None

    @property
    def n_expert(self) -> int:
        return int(self._raw[0].shape[0])

    def use_host_memory(self, memory: ExpertHostMemory) -> bool:
        """Read the experts from ``memory`` (the same bytes, copied into process memory, e.g. the CPU experts'
        ``host_memory``), registered with CUDA so copies to the GPU need no staging. Returns ``direct``: False
        when registration failed (logged), and then the bytes go through the pinned staging slots."""
        arrays = memory.arrays
        if [a.shape for a in arrays] != [tuple(r.shape) for r in self._raw]:
            raise ValueError(f"host memory holds {[a.shape for a in arrays]}; expected "
                             f"{[tuple(r.shape) for r in self._raw]}")
        self._raw = [torch.from_numpy(a) for a in arrays]
        self._host_memory = memory
        self.direct = memory.register_cuda()
        return self.direct

    def close(self) -> None:
        """Unregister the host memory this layer registered (the experts stay usable, through staging)."""
        if self._host_memory is not None:
            self._host_memory.close()
        self.direct = False

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Enqueue the experts of this batch (x [T, hidden] on the GPU); the host returns once the last
        expert's bytes are on their way."""
        out = torch.zeros(x.shape[0], self.layout.hidden, dtype=torch.float32, device=x.device)
        plan = route_plan(ids, weights)
        slot: int | None = None

        def staged(e: int) -> torch.Tensor:
            nonlocal slot
            if slot is not None:  # the previous expert's kernels are enqueued: its slot may be refilled after them
                self.staging.release(slot)
            buf, slot = self.staging.stage([raw[e] for raw in self._raw], pinned=self.direct)
            return buf

        for first, last in plan.chunks(CHUNK_PAIRS):
            accumulate_experts(out, x, plan, first, last, staged, self.layout)
        if slot is not None:
            self.staging.release(slot)
        self._out = out

    def wait(self) -> torch.Tensor:
        """[T, hidden] fp32 routed output on the GPU (stream-ordered: no host sync)."""
        assert self._out is not None, "wait() without submit()"
        out, self._out = self._out, None
        return out


@dataclasses.dataclass(frozen=True)
class CrossoverMeasurement:
    tokens: int
    cpu_seconds: float
    gpu_seconds: float


class StreamCrossover:
    """From how many tokens a call streams its experts to the GPU instead of computing them on the CPU.

    ``threshold`` given: use it. None: measured once, at the first call of at least ``min_tokens`` tokens,
    then shared by every layer holding this object. With CPU time ~ T · (its per-token cost) and GPU time
    ~ its full-transfer cost (which more tokens barely change), the crossover is T · gpu_s / cpu_s.
    ``split`` holds the CPU/GPU split rates for calls past the crossover, shared the same way (set by the
    first layer that splits, see ``HybridRoutedExperts``).
    """

    def __init__(self, threshold: int | None = None, min_tokens: int = CALIBRATION_TOKENS) -> None:
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold={threshold}; give an int >= 1 or None (measure)")
        self.threshold, self.min_tokens = threshold, min_tokens
        self.measurement: CrossoverMeasurement | None = None
        self.split: ExpertSplit | None = None

    def needs_measuring(self, num_tokens: int) -> bool:
        return self.threshold is None and num_tokens >= self.min_tokens

    def use_gpu(self, num_tokens: int) -> bool:
        return self.threshold is not None and num_tokens >= self.threshold

    def record(self, num_tokens: int, cpu_seconds: float, gpu_seconds: float) -> int:
        """Set the threshold from one CPU and one GPU call on the same ``num_tokens`` batch; returns it."""
        per_token_cpu = cpu_seconds / num_tokens
        self.threshold = max(1, math.ceil(gpu_seconds / per_token_cpu))
        self.measurement = CrossoverMeasurement(num_tokens, cpu_seconds, gpu_seconds)
        logger.info("routed experts at %d tokens: CPU %.1f ms (%.3f ms/token), GPU streamed %.1f ms: "
                    "streaming to the GPU from %d tokens", num_tokens, 1e3 * cpu_seconds, 1e3 * per_token_cpu,
                    1e3 * gpu_seconds, self.threshold)
        return self.threshold
