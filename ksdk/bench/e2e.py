"""End-to-end benchmark on a DeepSeek-R1-shaped synthetic model: the GPU path plus CPU routed experts.

It writes (once, cached) a GGUF with R1's real dimensions (``ksdk/data/deepseek-r1-config.json``) but only
``--layers`` layers, every tensor random VALID blocks in a Q4_K_M-like mix, then loads it as the engine
would (``device="cuda"``: non-expert weights as GGUF blocks on the GPU, experts native on the CPU) and reports:

- decode tok/s at each batch size (every sequence at ``--context`` tokens), prefill tok/s per prompt length;
- GPU memory, and the time in CPU experts vs the rest (GPU work plus transfers): per layer for eager MoE layers
  (``--graphs attention`` or ``off``); per step for the whole-step CUDA graph (``--graphs step``, the default),
  where the experts are timed inside the native host call and the GPU side is a step whose host calls skip
  the experts (zero their output) with every copy and host round trip kept (``--host-calls`` picks how the
  graph hands the experts to the CPU: doorbells a native thread polls, or the driver's host nodes);
- for prefill, where the routed experts ran (CPU, or streamed to the GPU from the measured crossover on, with
  the CPU-only figure beside it) and that crossover;
- the decode step extrapolated to R1's 61 layers (3 dense + 58 MoE), beside the host-bandwidth floor:
  the expert bytes the batch reads per token over the host's measured read bandwidth (DESIGN.md §6).

``--small`` swaps in tiny dimensions for a smoke run on any machine (``--device cpu`` works too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import torch

from ksdk.bench.random_blocks import random_expert_tensor
from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.layers.moe import MoE, RoutedExperts
from ksdk.models import DeepseekForCausalLM, load_model
from ksdk.models.deepseek import CUDA_GRAPH_MODES
from ksdk.offload.cpu_experts import default_num_threads
from ksdk.offload.host_call import HOST_CALL_MODES
from ksdk.offload.native import load_native
from ksdk.offload.options import EXPERT_MEMORY, ExpertOptions
from ksdk.offload.routed import HybridRoutedExperts, NativeRoutedExperts
from ksdk.testing import QTYPE_POLICIES, TinyModelSpec, cache_dir
from ksdk.testing.tiny_models import add_metadata
from ksdk.weights.gguf_file import GGUFFile

__all__ = ["E2EConfig", "add_parser", "r1_spec", "run_e2e", "synthetic_gguf"]

Q = gguf.GGMLQuantizationType
FILE_VERSION = 1  # bump when the synthetic file's content changes
DESIGN_EXPERT_GB_PER_TOKEN = 12.4  # DESIGN.md §6: R1 at Q4_K_M, 8 experts x 58 layers


@dataclass(frozen=True)
class E2EConfig:
    layers: int = 4
    dense_layers: int = 1
    batches: tuple[int, ...] = (1, 4, 16)
    prefill: tuple[int, ...] = (512, 2048)
    context: int = 1024  # tokens already cached per sequence when decoding
    decode_steps: int = 8
    page_size: int = 64
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    small: bool = False
    profile: bool = False  # torch.profiler's op tables: a decode step at the first batch size, the longest prefill
    cuda_graphs: tuple[str, ...] = ("step",)  # DeepseekForCausalLM.cuda_graphs modes, one decode table each
    expert_memory: str = "mmap"  # ExpertOptions.memory: where the routed experts' bytes live
    host_calls: tuple[str, ...] = ("doorbell",)  # DecodeGraphs.host_calls modes, one step-graph table each
    # routed experts per MoE layer kept in GPU memory (ExpertOptions.gpu_bytes): 0 and/or one count N, a decode
    # table each (the model loads N per layer; 0 detaches them); prefill runs with N
    gpu_experts: tuple[int, ...] = (0,)


def _r1_config() -> dict:
    return json.loads(resources.files("ksdk").joinpath("data/deepseek-r1-config.json").read_text())


def r1_spec(layers: int, dense_layers: int, *, small: bool = False) -> TinyModelSpec:
    """R1's shape (or, ``small``, tiny dimensions) with ``layers`` layers, the first ``dense_layers`` dense."""
    if not 0 <= dense_layers < layers:
        raise ValueError(f"dense_layers={dense_layers} with layers={layers}: need 0 <= dense_layers < layers")
    if small:
        return TinyModelSpec(num_layers=layers, num_dense_layers=dense_layers, num_experts=64, vocab_size=4096)
    c = _r1_config()
    rope = c["rope_scaling"]
    return TinyModelSpec(
        kind="v3", num_layers=layers, num_dense_layers=dense_layers, hidden_size=c["hidden_size"],
        num_heads=c["num_attention_heads"], q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        intermediate_size=c["intermediate_size"], moe_intermediate_size=c["moe_intermediate_size"],
        num_experts=c["n_routed_experts"], num_experts_per_tok=c["num_experts_per_tok"],
        num_shared_experts=c["n_shared_experts"], num_groups=c["n_group"], topk_groups=c["topk_group"],
        routed_scaling_factor=c["routed_scaling_factor"], vocab_size=c["vocab_size"],
        context_length=rope["original_max_position_embeddings"] * int(rope["factor"]), rope_theta=c["rope_theta"],
        rope_factor=rope["factor"], rope_original_context=rope["original_max_position_embeddings"],
        mscale_all_dim=rope["mscale_all_dim"], rms_norm_eps=c["rms_norm_eps"],
    )


# ---- the synthetic file ----


def _tensor_shapes(spec: TinyModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in torch order, in file order."""
    H, heads = spec.hidden_size, spec.num_heads
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (spec.vocab_size, H), "output_norm.weight": (H,),
                                          "output.weight": (spec.vocab_size, H)}
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (H,), p + "attn_q_a.weight": (spec.q_lora_rank, H),
                   p + "attn_q_a_norm.weight": (spec.q_lora_rank,), p + "attn_q_b.weight": (heads * qk, spec.q_lora_rank),
                   p + "attn_kv_a_mqa.weight": (spec.kv_lora_rank + spec.qk_rope_head_dim, H),
                   p + "attn_kv_a_norm.weight": (spec.kv_lora_rank,),
                   p + "attn_kv_b.weight": (heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank),
                   p + "attn_output.weight": (H, heads * spec.v_head_dim), p + "ffn_norm.weight": (H,)}
        if i < spec.num_dense_layers:
            I = spec.intermediate_size
            shapes |= {p + "ffn_gate.weight": (I, H), p + "ffn_up.weight": (I, H), p + "ffn_down.weight": (H, I)}
            continue
        E, I = spec.num_experts, spec.moe_intermediate_size
        S = I * spec.num_shared_experts
        shapes |= {p + "ffn_gate_inp.weight": (E, H), p + "exp_probs_b.bias": (E,),
                   p + "ffn_gate_exps.weight": (E, I, H), p + "ffn_up_exps.weight": (E, I, H),
                   p + "ffn_down_exps.weight": (E, H, I), p + "ffn_gate_shexp.weight": (S, H),
                   p + "ffn_up_shexp.weight": (S, H), p + "ffn_down_shexp.weight": (H, S)}
    return shapes


def _qtype(name: str, shape: tuple[int, ...]) -> Q:
    """Norms, biases and the router in F32 as real files keep them; the rest in the Q4_K_M mix."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    qtype = QTYPE_POLICIES["Q4_K_M"](name)
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.Q8_0


def _random_q5_0(rows: int, cols: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Q5_0 blocks (d f16, 4 bytes of high bits, 16 of nibbles): random quants, d sized for ``scale``."""
    raw = np.frombuffer(rng.bytes(rows * cols // 32 * 22), dtype=np.uint8).reshape(-1, 22).copy()
    raw[:, :2] = (rng.uniform(0.5, 1.0, raw.shape[0]) * scale / 8).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _random_tensor(name: str, shape: tuple[int, ...], qtype: Q, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype == Q.F32:
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) * (0.05 if len(shape) == 1 else shape[-1] ** -0.5)).astype(np.float32)
    scale = 1.0 if name == "token_embd.weight" else shape[-1] ** -0.5  # unit-variance outputs
    n_expert, rows, cols = (1, *shape) if len(shape) == 2 else shape
    if qtype == Q.Q5_0:
        return _random_q5_0(rows, cols, rng, scale).reshape(*shape[:-1], -1)
    raw = random_expert_tensor(qtype, n_expert, rows, cols, seed=seed, scale=scale).raw
    return raw.reshape(*shape[:-1], -1)


def synthetic_gguf(spec: TinyModelSpec, folder: Path | None = None) -> Path:
    """The cached synthetic file for ``spec``, written on first use one tensor at a time (bounded memory)."""
    folder = folder or cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic-v{FILE_VERSION}-{spec.tag}.gguf"
    if path.exists():
        return path
    shapes = _tensor_shapes(spec)
    qtypes = {name: _qtype(name, shape) for name, shape in shapes.items()}
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "deepseek2")
    add_metadata(writer, spec, f"ksdk synthetic R1-shaped {spec.num_layers} layers")
    for name, shape in shapes.items():
        qtype = qtypes[name]
        if qtype == Q.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (*shape[:-1], shape[-1] // block_values * block_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in shapes.items():
        writer.write_tensor_data(_random_tensor(name, shape, qtypes[name], zlib.crc32(name.encode())))
    writer.close()
    tmp.replace(path)
    os.sync()  # write the dirty pages back now: writeback would otherwise compete with the timed runs
    return path


# ---- measuring ----


class _Clock:
    """Wall time with the device drained first, so GPU work is counted where it was issued."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class _TimedExperts:
    """Wraps a layer's routed experts to add up the time spent in them (device drained at both ends)."""

    def __init__(self, inner: RoutedExperts, clock: _Clock) -> None:
        self.inner, self.clock, self.seconds = inner, clock, 0.0
        self._start = 0.0

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self._start = self.clock.now()
        self.inner.submit(x, ids, weights)

    def wait(self) -> torch.Tensor:
        out = self.inner.wait()  # the shared expert, launched in between, overlaps this span
        self.seconds += self.clock.now() - self._start
        return out


class _NoExperts:
    """Stands in for ``CPUExperts`` behind the GPU bridge: its copies and syncs still run, the experts add zero."""

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        out.zero_()

    def wait(self) -> None:
        pass


@dataclass(frozen=True)
class StepTimes:
    """Milliseconds per decode step replayed from the whole-step graph."""

    step_ms: float
    experts_ms: float  # in the routed experts, timed inside the native host calls (submit -> wait), all layers
    gpu_side_ms: float  # a step whose host calls skip the experts: GPU work, copies and host-node round trips
    rest_ms: float  # embedding, final norm and LM head, timed eagerly on their own
    gap_ms: float  # one MoE layer's non-expert span: from a host call's end to the next one's start (mean)
    lead_ms: float  # from the step's launch to its first host call: the dense layers and the first attention

    def r1_ms(self, moe_layers: int, dense_layers: int, full_moe: int, full_dense: int) -> float:
        """This step with the missing layers added at their measured cost: each MoE layer its experts and one
        gap; each dense layer the lead less one gap (the first MoE layer's attention), over the dense layers."""
        experts = self.experts_ms / moe_layers
        dense = max(0.0, self.lead_ms - self.gap_ms) / dense_layers
        return self.step_ms + (full_moe - moe_layers) * (experts + self.gap_ms) + (full_dense - dense_layers) * dense


@dataclass(frozen=True)
class LayerTimes:
    """Milliseconds per step of one layer: all of it, and the part in routed experts on the CPU."""

    total_ms: float
    experts_ms: float


def _device_timeline(events: list) -> str:
    """The step's device work in start order: offset from the first, duration and the idle span before each
    (where the stream waited: copies, the host's experts, launch latency), in us."""
    work = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    if not work:
        return "device timeline: no device events"
    t0, end = work[0].time_range.start, work[0].time_range.start
    lines = [f"device timeline ({len(work)} events; us: start, duration, idle before):"]
    idle_total = 0.0
    for e in work:
        idle = max(0.0, e.time_range.start - end)
        idle_total += idle
        lines.append(f"  {e.time_range.start - t0:9.1f} {e.time_range.end - e.time_range.start:8.1f} {idle:8.1f}  "
                     f"{e.name[:90]}")
        end = max(end, e.time_range.end)
    lines.append(f"  span {end - t0:.1f} us, idle {idle_total:.1f} us")
    return "\n".join(lines)


class _Runner:
    def __init__(self, model: DeepseekForCausalLM, config: E2EConfig) -> None:
        self.model, self.config = model, config
        self.device = model.device
        self.clock = _Clock(self.device)
        self.page_size = config.page_size
        per_seq = -(-(config.context + 1) // self.page_size)
        num_pages = max(max(config.batches) * per_seq, -(-max(config.prefill) // self.page_size))
        gen = torch.Generator().manual_seed(0)
        self.kv = [(0.5 * torch.randn(num_pages, self.page_size, model.kv_cache_dim, generator=gen))
                   .to(self.device, model.kv_dtype) for _ in model.layers]
        self.per_seq = per_seq

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        self.model(ids, positions, meta, self.kv)

    def _decode_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ctx = self.config.context
        tables = [list(range(b * self.per_seq, (b + 1) * self.per_seq)) for b in range(batch)]
        meta = AttentionMetadata.build([1] * batch, [ctx + 1] * batch, tables, self.page_size, self.device)
        ids = torch.randint(0, self.model.config.vocab_size, (batch,), device=self.device)
        return ids, torch.full((batch,), ctx, device=self.device), meta

    def decode_seconds(self, batch: int) -> float:
        """Seconds per decode step of ``batch`` sequences."""
        inputs = self._decode_inputs(batch)
        for _ in range(2):
            self._step(*inputs)
        return self._timed_steps(inputs)

    def _timed_steps(self, inputs: tuple[torch.Tensor, torch.Tensor, AttentionMetadata]) -> float:
        start = self.clock.now()
        for _ in range(self.config.decode_steps):
            self._step(*inputs)
        return (self.clock.now() - start) / self.config.decode_steps

    def graph_step_times(self, batch: int) -> StepTimes:
        """The whole-step graph's step, its time in the routed experts, and its GPU side (see StepTimes)."""
        graphs = self.model.decode_graphs
        assert graphs is not None and self.model.cuda_graphs == "step"
        inputs = self._decode_inputs(batch)
        for _ in range(2):  # the first captures
            self._step(*inputs)
        log = graphs.log
        log.reset_counters()
        step = self._timed_steps(inputs)
        experts_ms = log.expert_ns / 1e6 / self.config.decode_steps
        gap_ms = log.gap_ns / 1e6 / max(1, log.gaps)
        lead_ms = log.lead_ns / 1e6 / max(1, log.leads)
        log.skip_experts = True
        try:
            gpu_side = self._timed_steps(inputs)
        finally:
            log.skip_experts = False
        return StepTimes(1e3 * step, experts_ms, 1e3 * gpu_side, 1e3 * self._rest_seconds(inputs[0]), gap_ms, lead_ms)

    @torch.inference_mode()
    def _rest_seconds(self, ids: torch.Tensor) -> float:
        """Embedding, final norm and LM head of one decode step, eagerly (they are outside the layers)."""
        model = self.model

        def rest() -> None:
            model.lm_head(model.norm(model.embed(ids))).float()

        rest()
        start = self.clock.now()
        for _ in range(self.config.decode_steps):
            rest()
        return (self.clock.now() - start) / self.config.decode_steps

    def gpu_side_seconds(self, batch: int) -> float:
        """Seconds per decode step with the routed experts' compute taken out (their transfers kept): the part
        of a step that the GPU path costs on top of the CPU experts."""
        saved = [(layer.ffn, layer.ffn.experts) for layer in self.model.layers if hasattr(layer.ffn, "experts")]
        try:
            for moe, _ in saved:
                moe.experts = NativeRoutedExperts(_NoExperts(), self.device)  # type: ignore[arg-type]
            return self.decode_seconds(batch)
        finally:
            for moe, experts in saved:
                moe.experts = experts

    def _prefill_inputs(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        pages = list(range(-(-tokens // self.page_size)))
        meta = AttentionMetadata.build([tokens], [tokens], [pages], self.page_size, self.device)
        ids = torch.randint(0, self.model.config.vocab_size, (tokens,), device=self.device)
        return ids, torch.arange(tokens, device=self.device), meta

    def prefill_seconds(self, tokens: int) -> float:
        inputs = self._prefill_inputs(tokens)
        self._step(*inputs)  # warm-up (kernel compilation, pinned buffers)
        start = self.clock.now()
        self._step(*inputs)
        return self.clock.now() - start

    @contextlib.contextmanager
    def _timed_layers(self) -> Iterator[list[float]]:
        """While open, the seconds of each layer's forward (device drained around it) are appended in order."""
        starts: list[float] = []
        totals: list[float] = []
        hooks = []
        for layer in self.model.layers:
            hooks.append(layer.register_forward_pre_hook(lambda *_: starts.append(self.clock.now())))
            hooks.append(layer.register_forward_hook(lambda *_: totals.append(self.clock.now() - starts[-1])))
        try:
            yield totals
        finally:
            for h in hooks:
                h.remove()

    def prefill_layer_ms(self, tokens: int) -> tuple[list[float], float]:
        """Per-layer ms of one prefill step of ``tokens`` (device drained around each layer), and the step's."""
        inputs = self._prefill_inputs(tokens)
        with self._timed_layers() as totals:
            start = self.clock.now()
            self._step(*inputs)
            step = self.clock.now() - start
        return [1e3 * t for t in totals], 1e3 * step

    def profile(self, batch: int, rows: int = 30) -> str:
        """torch.profiler's op table (by device time) for one decode step of ``batch`` sequences."""
        inputs = self._decode_inputs(batch)
        self._step(*inputs)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.clock.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            start = self.clock.now()
            self._step(*inputs)
            wall = self.clock.now() - start
        events = prof.key_averages()
        sort = "device_time_total" if self.clock.cuda else "cpu_time_total"
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        table = events.table(sort_by=sort, row_limit=rows)
        if self.clock.cuda:
            table += "\n" + _device_timeline(prof.events())
        return (f"one decode step, batch {batch}: {1e3 * wall:.2f} ms wall (profiled), {kernels} kernels, "
                f"{device_us / 1e3:.2f} ms of kernel time\n" + table)

    def profile_prefill(self, tokens: int, rows: int = 30) -> str:
        """torch.profiler's op table (by device time) for one prefill step of ``tokens``."""
        inputs = self._prefill_inputs(tokens)
        self._step(*inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = self.clock.now()
            self._step(*inputs)
            wall = self.clock.now() - start
        return (f"one prefill step of {tokens} tokens: {1e3 * wall:.1f} ms wall (profiled)\n"
                + prof.key_averages().table(sort_by="device_time_total", row_limit=rows))

    def layer_times(self, batch: int) -> tuple[list[LayerTimes], float]:
        """Per-layer times of one decode step (device drained around each layer), and the step's total."""
        inputs = self._decode_inputs(batch)
        timed: list[_TimedExperts | None] = []
        for layer in self.model.layers:
            experts = getattr(layer.ffn, "experts", None)
            timed.append(None if experts is None else _TimedExperts(experts, self.clock))
            if experts is not None:
                layer.ffn.experts = timed[-1]
        try:
            self._step(*inputs)  # warm
            for t in timed:
                if t is not None:
                    t.seconds = 0.0
            with self._timed_layers() as totals:
                start = self.clock.now()
                self._step(*inputs)
                step = self.clock.now() - start
        finally:
            for layer, t in zip(self.model.layers, timed):
                if t is not None:
                    layer.ffn.experts = t.inner
        return [LayerTimes(1e3 * total, 1e3 * (t.seconds if t else 0.0)) for total, t in zip(totals, timed)], 1e3 * step


@dataclass(frozen=True)
class _Floor:
    """The host-bandwidth floor of R1's decode (DESIGN.md §6) for a batch of random tokens: the time to read
    the distinct experts each MoE layer computes on the CPU (``on_gpu`` of each layer's experts do not count)."""

    spec: TinyModelSpec
    host_gbs: float
    expert_mb: float
    moe_layers: int  # R1's 58
    on_gpu: int = 0  # experts per layer resident in GPU memory

    def tok_s(self, batch: int) -> float:
        E, k = self.spec.num_experts, self.spec.num_experts_per_tok
        # expected experts of the CPU's E - on_gpu that `batch` random tokens touch
        distinct = (E - self.on_gpu) * (1 - (1 - k / E) ** batch)
        return batch * self.host_gbs * 1e9 / (self.moe_layers * distinct * self.expert_mb * 1e6)


def _decode_table_step_graph(runner: _Runner, spec: TinyModelSpec, config: E2EConfig, floor: _Floor,
                             full_dense: int, host_calls: str) -> None:
    """Decode replayed from the whole-step graph. The 61-layer estimate is this step plus the layers it lacks,
    each at its own measured cost (StepTimes.r1_ms): a MoE layer's experts and the span between two host calls,
    a dense layer from the span before the first host call (``_run`` checks the model has both kinds)."""
    moe_layers, dense_layers = spec.num_layers - spec.num_dense_layers, spec.num_dense_layers
    runner.model.decode_graphs.host_calls = host_calls  # type: ignore[union-attr]
    how = {"doorbell": "doorbells served by a native thread", "driver": "driver host nodes"}[host_calls]
    print(f"decode replayed from one CUDA graph per step (routed experts through {how}):")
    print(f"{'decode':>8} {'tok/s':>8} {'ms/step':>8} | {'experts ms':>10} {'MoE gap':>7} {'lead':>6} "
          f"{'GPU side':>8} {'rest ms':>7} | {'61-layer tok/s':>14} {'floor tok/s':>11} {'share':>6}")
    rows = []
    for batch in config.batches:
        t = runner.graph_step_times(batch)
        full_ms = t.r1_ms(moe_layers, dense_layers, floor.moe_layers, full_dense)
        full_tps, floor_tps = batch / full_ms * 1e3, floor.tok_s(batch)
        rows.append((batch, t, full_ms))
        print(f"{batch:>8} {batch / t.step_ms * 1e3:>8.1f} {t.step_ms:>8.2f} | {t.experts_ms:>10.2f} "
              f"{t.gap_ms:>7.3f} {t.lead_ms:>6.2f} {t.gpu_side_ms:>8.2f} {t.rest_ms:>7.2f} | {full_tps:>14.2f} "
              f"{floor_tps:>11.2f} {full_tps / floor_tps:>6.0%}", flush=True)
    print(f"\n{'decode':>8} {'61-layer ms':>11} {'of it experts':>13} {'non-expert/experts':>18}   (experts: time "
          f"inside the native host calls; MoE gap: from one host call's end to the next one's start, a MoE layer's "
          f"GPU work with its copies and host round trip; lead: launch to the first host call, the dense "
          f"layers and the first attention; GPU side: a step whose host calls skip the experts)")
    for batch, t, full_ms in rows:
        experts = floor.moe_layers * t.experts_ms / moe_layers
        print(f"{batch:>8} {full_ms:>11.1f} {experts:>13.1f} {(full_ms - experts) / max(experts, 1e-9):>18.0%}")


def _decode_table_eager(runner: _Runner, spec: TinyModelSpec, config: E2EConfig, floor: _Floor,
                        full_dense: int) -> None:
    """Decode with eager MoE layers, timed per layer (device drained around each)."""
    moe_full = floor.moe_layers
    print(f"{'decode':>8} {'tok/s':>8} {'ms/step':>8} | {'dense ms':>9} {'MoE ms':>7} {'of it CPU':>9} "
          f"{'GPU+xfer':>8} | {'61-layer tok/s':>14} {'floor tok/s':>11} {'share':>6}")
    gpu_side: list[tuple[int, float, float]] = []  # batch, GPU-side ms/step, CPU-expert ms/step
    for batch in config.batches:
        step = runner.decode_seconds(batch)
        times, profiled = runner.layer_times(batch)
        dense = [t for i, t in enumerate(times) if i < spec.num_dense_layers]
        moe = [t for i, t in enumerate(times) if i >= spec.num_dense_layers]
        dense_ms = sum(t.total_ms for t in dense) / max(1, len(dense))
        moe_ms = sum(t.total_ms for t in moe) / len(moe)
        cpu_ms = sum(t.experts_ms for t in moe) / len(moe)
        rest_ms = max(0.0, profiled - sum(t.total_ms for t in times))  # embedding, final norm, LM head
        full_ms = rest_ms + full_dense * dense_ms + moe_full * moe_ms
        floor_tps = floor.tok_s(batch)
        full_tps = batch / full_ms * 1e3
        gpu_side.append((batch, 1e3 * runner.gpu_side_seconds(batch), cpu_ms * len(moe)))
        print(f"{batch:>8} {batch / step:>8.1f} {1e3 * step:>8.1f} | {dense_ms:>9.2f} {moe_ms:>7.2f} {cpu_ms:>9.2f} "
              f"{moe_ms - cpu_ms:>8.2f} | {full_tps:>14.2f} {floor_tps:>11.2f} {full_tps / floor_tps:>6.0%}", flush=True)
    print(f"\n{'decode':>8} {'GPU-side ms/step':>16} {'CPU experts ms/step':>19} {'GPU/CPU':>8}   "
          f"(GPU side: a step with the experts' compute stubbed out, their transfers kept)")
    for batch, gpu_ms, cpu_step_ms in gpu_side:
        print(f"{batch:>8} {gpu_ms:>16.2f} {cpu_step_ms:>19.2f} {gpu_ms / max(cpu_step_ms, 1e-9):>8.0%}")


def _cpu_only(hybrids: list[HybridRoutedExperts], run: Callable[[], float]) -> float:
    """``run()`` with every layer's routed experts held on the CPU (the shared crossover's threshold lifted)."""
    crossover = hybrids[0].crossover
    saved = crossover.threshold
    crossover.threshold = 1 << 62
    try:
        return run()
    finally:
        crossover.threshold = saved


def _gpu_only(hybrids: list[HybridRoutedExperts], run: Callable[[], str]) -> str:
    """``run()`` with the CPU's share of long batches off: the GPU streams every expert."""
    saved = [h.split for h in hybrids]
    for h in hybrids:
        h.split = False
    try:
        return run()
    finally:
        for h, split in zip(hybrids, saved):
            h.split = split


def _tensor_bytes(module: torch.nn.Module, device: torch.device) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device.type)


def _expert_bytes(gguf_file: GGUFFile, layer: int) -> int:
    """Bytes of one routed expert (gate + up + down) in ``layer``."""
    views = [gguf_file.tensor(f"blk.{layer}.ffn_{w}_exps.weight") for w in ("gate", "up", "down")]
    return sum(v.nbytes // v.shape[0] for v in views)


def _prefault_experts(gguf_file: GGUFFile, num_layers: int, first_moe: int) -> None:
    """Touch every page of the routed experts once, so the timed steps read memory, not page faults."""
    for layer in range(first_moe, num_layers):
        for w in ("gate", "up", "down"):
            flat = gguf_file.tensor(f"blk.{layer}.ffn_{w}_exps.weight").raw.reshape(-1)
            int(flat[::4096].sum())


def run_e2e(config: E2EConfig) -> None:
    device = torch.device(config.device)
    r1 = _r1_config()
    full_layers, full_dense = r1["num_hidden_layers"], r1["first_k_dense_replace"]
    spec = r1_spec(config.layers, config.dense_layers, small=config.small)
    print(f"ksdk e2e benchmark: {'tiny' if config.small else 'R1'}-shaped, {spec.num_layers} layers "
          f"({spec.num_dense_layers} dense), Q4_K_M-like mix, {config.dtype} on {device}"
          f"{'' if device.type != 'cuda' else ', CUDA graphs: ' + ' then '.join(config.cuda_graphs)}", flush=True)
    print("  synthetic file (cached after the first run) ...", flush=True)
    path = synthetic_gguf(spec)
    gguf_file = GGUFFile.open(path)
    print(f"  {path} ({path.stat().st_size / 1e9:.1f} GB)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    moe_layer = spec.num_dense_layers
    expert_bytes = _expert_bytes(gguf_file, moe_layer)
    on_gpu_count = max(config.gpu_experts)
    on_gpu_bytes = on_gpu_count * expert_bytes * (spec.num_layers - spec.num_dense_layers)
    model = load_model(gguf_file, device=device, dtype=config.dtype,
                       experts=ExpertOptions(backend="native", memory=config.expert_memory,  # type: ignore[arg-type]
                                             gpu_bytes=on_gpu_bytes))
    runner = _Runner(model, config)
    _prefault_experts(gguf_file, spec.num_layers, spec.num_dense_layers)

    native = load_native()
    threads = default_num_threads()
    # As the experts benchmark probes (4 GiB, best of 5): with 2 GiB and 3 reads this probe read 73 GB/s on a
    # lent machine where that benchmark read 118 GB/s minutes later.
    probe = min(4 << 30, max(1 << 30, path.stat().st_size // 4))
    host_gbs = native.read_bandwidth(probe, threads, 5)
    expert_mb = expert_bytes / 1e6
    print(f"  host read bandwidth: {host_gbs:.1f} GB/s ({threads} threads); one routed expert: {expert_mb:.1f} MB")

    # GPU memory: what is resident now, and the same extrapolated to R1's 61 layers.
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        layer_bytes = [_tensor_bytes(layer, device) for layer in model.layers]
        dense_b, moe_b = layer_bytes[0] if spec.num_dense_layers else 0, layer_bytes[moe_layer]
        full = resident - sum(layer_bytes) + full_dense * dense_b + (full_layers - full_dense) * moe_b
        on_gpu = on_gpu_count * expert_bytes
        full += (full_layers - full_dense) * on_gpu
        print(f"  GPU memory after load: {resident / 2**30:.2f} GiB (dense layer {dense_b / 2**20:.0f} MiB, "
              f"MoE layer {moe_b / 2**20:.0f} MiB without experts, + {on_gpu_count} resident routed experts "
              f"{on_gpu / 2**20:.0f} MiB); at {full_layers} layers: {full / 2**30:.2f} GiB + KV cache")
    print()

    E, k, moe_full = spec.num_experts, spec.num_experts_per_tok, full_layers - full_dense
    moes = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    residents = [moe.resident for moe in moes]
    for on_gpu_now in config.gpu_experts:
        for moe, resident in zip(moes, residents):
            moe.resident = resident if on_gpu_now else None
        if model.decode_graphs is not None:
            model.decode_graphs.clear()  # the graphs bind the resident experts present at capture
        if len(config.gpu_experts) > 1:
            print(f"-- {on_gpu_now} routed experts per MoE layer on the GPU --")
        floor = _Floor(spec, host_gbs, expert_mb, moe_full, on_gpu_now)
        for mode in config.cuda_graphs:
            model.cuda_graphs = mode  # type: ignore[assignment]
            if device.type == "cuda" and mode == "step" and model.decode_graphs and model.decode_graphs.capturable:
                for host_calls in config.host_calls:
                    _decode_table_step_graph(runner, spec, config, floor, full_dense, host_calls)
            else:
                print(f"decode with {'eager' if device.type != 'cuda' or mode == 'off' else 'per-layer attention-graph'}"
                      f" launches, MoE layers eager (sync, submit, wait):")
                _decode_table_eager(runner, spec, config, floor, full_dense)
            print()
    for moe, resident in zip(moes, residents):
        moe.resident = resident
    if config.profile:
        print()
        print(runner.profile(config.batches[0]), flush=True)
    print()
    hybrids = [layer.ffn.experts for layer in model.layers
               if isinstance(getattr(layer.ffn, "experts", None), HybridRoutedExperts)]
    for tokens in config.prefill:
        seconds = runner.prefill_seconds(tokens)  # its warm-up call measures the GPU-streaming crossover once
        paths = sorted({h.last_path for h in hybrids}) or ["cpu"]
        line = (f"prefill {tokens:>6} tokens: {tokens / seconds:>9.1f} tok/s ({1e3 * seconds:.0f} ms, "
                f"{spec.num_layers} layers), experts on {'+'.join(paths)}")
        if hybrids and paths != ["cpu"]:
            cpu_seconds = _cpu_only(hybrids, lambda: runner.prefill_seconds(tokens))
            line += f"; CPU experts only: {tokens / cpu_seconds:.1f} tok/s ({1e3 * cpu_seconds:.0f} ms)"
        print(line, flush=True)
        print(_prefill_extrapolation(runner, tokens, full_dense, moe_full), flush=True)
        if config.profile and runner.clock.cuda and tokens == max(config.prefill):
            print(runner.profile_prefill(tokens), flush=True)
        splits = [h.last_split for h in hybrids if h.last_path == "cpu+gpu" and h.last_split is not None]
        if splits:
            print("    split per MoE layer (CPU experts/tokens/ms, GPU experts/ms): " + "; ".join(
                f"{r.cpu_experts}/{r.cpu_tokens}/{1e3 * r.cpu_seconds:.0f}, {r.gpu_experts}/{1e3 * r.gpu_seconds:.0f}"
                for r in splits), flush=True)
            gpu_only = _gpu_only(hybrids, lambda: _prefill_extrapolation(runner, tokens, full_dense, moe_full))
            print(f"    GPU experts only (no CPU share):{gpu_only.split(':', 1)[1]}", flush=True)
    if hybrids:
        crossover = hybrids[0].crossover
        measured = crossover.measurement
        how = ("given" if crossover.threshold is not None else
               f"not measured: no batch of {crossover.min_tokens} tokens or more") if measured is None else (
            f"measured at {measured.tokens} tokens: one MoE layer's routed experts took {1e3 * measured.cpu_seconds:.0f} ms "
            f"on the CPU, {1e3 * measured.gpu_seconds:.0f} ms streamed to the GPU "
            f"({E * expert_mb / 1e3 / measured.gpu_seconds:.1f} GB/s of expert bytes)")
        print(f"GPU-streaming threshold: {crossover.threshold} tokens ({how})")
    if device.type == "cuda":
        print(f"\nGPU memory peak: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"\nfloor = batch x host bandwidth / ({moe_full} MoE layers x expected distinct experts the CPU reads x "
          f"{expert_mb:.1f} MB, of each layer's {E} experts those not on the GPU); at batch 1 with all "
          f"experts on the CPU that is {moe_full * k * expert_mb / 1e3:.1f} GB per token "
          f"(DESIGN.md's {DESIGN_EXPERT_GB_PER_TOKEN} GB gives {host_gbs / DESIGN_EXPERT_GB_PER_TOKEN:.2f} tok/s). "
          f"61-layer figures scale the measured dense and MoE layer costs to {full_dense} and {moe_full} layers "
          f"(eager: per-layer times plus the rest; step graph: the step plus the missing layers).")


PREFILL_TARGETS = {2048: 250, 8192: 800}  # R1-extrapolated tok/s (issue #6)


def _prefill_extrapolation(runner: _Runner, tokens: int, full_dense: int, moe_full: int) -> str:
    """One more prefill step timed layer by layer, scaled to R1's dense and MoE layer counts."""
    layer_ms, step_ms = runner.prefill_layer_ms(tokens)
    is_moe = [hasattr(layer.ffn, "experts") for layer in runner.model.layers]
    dense = [ms for ms, moe in zip(layer_ms, is_moe) if not moe]
    moe = [ms for ms, moe in zip(layer_ms, is_moe) if moe]
    if not dense or not moe:
        return "    (61-layer figure needs at least one dense and one MoE layer)"
    dense_ms, moe_ms = sum(dense) / len(dense), sum(moe) / len(moe)
    full_ms = step_ms - sum(layer_ms) + full_dense * dense_ms + moe_full * moe_ms
    target = PREFILL_TARGETS.get(tokens)
    return (f"    this step {step_ms:.0f} ms: dense layer {dense_ms:.1f} ms, MoE layer {moe_ms:.1f} ms, rest "
            f"{step_ms - sum(layer_ms):.1f} ms -> {full_dense + moe_full} layers: {tokens / full_ms * 1e3:.0f} tok/s, "
            f"time to first token {full_ms / 1e3:.2f} s" + (f" (target >= {target} tok/s)" if target else ""))


def _ints(text: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ints, e.g. 1,4,16") from exc
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= {minimum}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    return _ints(text, 1)


def _counts(text: str) -> tuple[int, ...]:
    return _ints(text, 0)


def _graph_modes(text: str) -> tuple[str, ...]:
    modes = tuple(text.split(","))
    bad = [m for m in modes if m not in CUDA_GRAPH_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: modes are {', '.join(CUDA_GRAPH_MODES)}")
    return modes


def _host_call_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in HOST_CALL_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"{text!r}: modes are {', '.join(HOST_CALL_MODES)}")
    return modes


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; use --device cpu (with --small) for a smoke run")
    counts = set(args.gpu_experts)
    if max(counts) and (args.device != "cuda" or len(counts - {0}) > 1):
        raise SystemExit(f"--gpu-experts {','.join(map(str, args.gpu_experts))}: experts per MoE layer on the GPU "
                         f"need --device cuda; give 0 and/or one count")
    if not 0 <= args.dense_layers < args.layers:
        raise SystemExit(f"--dense-layers {args.dense_layers}: need 0 <= dense layers < --layers {args.layers}")
    if args.device == "cuda" and "step" in args.graphs and (args.dense_layers < 1 or args.layers - args.dense_layers < 2):
        raise SystemExit("--graphs step extrapolates from the span between two MoE layers' host calls and from the "
                         "dense layers before them: give --dense-layers >= 1 and --layers >= --dense-layers + 2")
    run_e2e(E2EConfig(layers=args.layers, dense_layers=args.dense_layers, batches=args.batches,
                      prefill=args.prefill, context=args.context, decode_steps=args.steps, device=args.device,
                      dtype=_DTYPES[args.dtype], small=args.small, profile=args.profile,
                      cuda_graphs=args.graphs, expert_memory=args.expert_memory, host_calls=args.host_calls,
                      gpu_experts=args.gpu_experts))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "e2e",
        help="R1-shaped synthetic model, GPU path + CPU experts: decode/prefill tok/s vs the host-bandwidth floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = E2EConfig()
    parser.add_argument("--layers", type=int, default=defaults.layers, help="layers in the synthetic model (default 4)")
    parser.add_argument("--dense-layers", type=int, default=defaults.dense_layers,
                        help="leading dense layers among them (default 1; R1 has 3)")
    parser.add_argument("--batches", type=_int_list, default=defaults.batches, help="decode batch sizes (default 1,4,16)")
    parser.add_argument("--prefill", type=_int_list, default=defaults.prefill, help="prompt lengths (default 512,2048)")
    parser.add_argument("--context", type=int, default=defaults.context, help="cached tokens per decoding sequence")
    parser.add_argument("--steps", type=int, default=defaults.decode_steps, help="timed decode steps per batch size")
    parser.add_argument("--device", default=defaults.device, choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--small", action="store_true", help="tiny dimensions: a smoke run on any machine")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's op tables for one decode step at the first batch size and "
                             "(on CUDA) one prefill step of the longest prompt")
    parser.add_argument("--expert-memory", default=defaults.expert_memory, choices=EXPERT_MEMORY,
                        help="routed experts read from the memory-mapped file (mmap), or copied into process memory "
                             "(ram; locked: also mlock'ed), which a GPU streams from directly (default mmap)")
    parser.add_argument("--graphs", type=_graph_modes, default=defaults.cuda_graphs,
                        help="comma-separated CUDA-graph modes, one decode table each: step (the whole decode step, "
                             "routed experts as host nodes), attention (per-layer attention graphs, eager MoE), "
                             "off (default step)")
    parser.add_argument("--host-calls", type=_host_call_modes, default=defaults.host_calls,
                        help="comma-separated ways the step graph runs the routed experts, one decode table each: "
                             "doorbell (a native thread polls pinned memory the step writes), driver (host nodes "
                             "on the CUDA driver's thread) (default doorbell)")
    parser.add_argument("--gpu-experts", type=_counts, default=defaults.gpu_experts,
                        help="routed experts per MoE layer kept in GPU memory (the lowest-numbered), a decode table "
                             "each: 0 and/or one count, e.g. 0,32 (default 0); the floor then counts only the "
                             "experts the CPU reads; prefill runs with the count")
    parser.set_defaults(run=_run)
