"""Routed MoE experts computed on the CPU by native kernels, straight from GGUF blocks.

``CPUExperts`` wraps one MoE layer's three expert tensors (gate, up: [E, I, H]; down: [E, H, I], in
their GGUF quant types) and computes ``Σ_k w_k · down_e(silu(gate_e·x) ⊙ up_e·x)`` for T tokens. The
model calls :meth:`CPUExperts.submit` and overlaps GPU work before :meth:`CPUExperts.wait`.
"""

from __future__ import annotations

import os
from typing import Protocol

import gguf
import numpy as np
import torch

from ksdk.errors import InvalidRequestError, ModelFileError, UnsupportedQuantError
from ksdk.offload.host_memory import ExpertHostMemory
from ksdk.offload.native import load_native

__all__ = ["SUPPORTED_QTYPES", "CPUExperts", "ExpertTensorView", "default_num_threads", "physical_cores"]

Q = gguf.GGMLQuantizationType
SUPPORTED_QTYPES: tuple[Q, ...] = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.BF16, Q.F16)
ISAS = ("auto", "scalar", "avx2", "avx512vnni")
TILE_ISAS = ("auto", "amx", "amx-emulated", "off")
PHASES = ("quantize_x", "pack_x", "gate_up", "quantize_h", "down")


class ExpertTensorView(Protocol):
    """What CPUExperts needs of a GGUF tensor view (``ksdk.weights.gguf_file.TensorView`` has it)."""

    @property
    def qtype(self) -> gguf.GGMLQuantizationType: ...
    @property
    def shape(self) -> tuple[int, ...]: ...  # (n_expert, out_features, in_features), torch order
    @property
    def raw(self) -> np.ndarray: ...  # uint8 (n_expert, out_features, bytes_per_row), zero-copy


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as pkg, open(f"{topology}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus)  # no sysfs topology (containers, other OSes): count logical CPUs
    return len(cores)


def default_num_threads() -> int:
    """Physical cores minus one (left for the engine's own threads), at least one."""
    return max(1, physical_cores() - 1)


def _check_view(role: str, view: ExpertTensorView, shape: tuple[int, int, int]) -> None:
    name = str(getattr(view, "name", role))  # GGUF views carry the tensor name; stand-ins may not
    if view.qtype not in SUPPORTED_QTYPES:
        raise UnsupportedQuantError(name, Q(view.qtype).name, [q.name for q in SUPPORTED_QTYPES])
    if tuple(view.shape) != shape:
        raise ModelFileError(f"expert tensor {name!r} has shape {tuple(view.shape)}; expected {shape}")
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[view.qtype]
    if shape[2] % block_values:
        raise ModelFileError(
            f"expert tensor {name!r}: in_features {shape[2]} is not a multiple of {Q(view.qtype).name}'s "
            f"block of {block_values} values"
        )
    raw_shape = (shape[0], shape[1], shape[2] // block_values * block_bytes)
    if view.raw.dtype != np.uint8 or view.raw.shape != raw_shape:
        raise ModelFileError(
            f"expert tensor {name!r}: raw bytes are {view.raw.dtype} {view.raw.shape}; expected uint8 {raw_shape}"
        )


class CPUExperts:
    """One layer's routed experts, computed on the CPU from their GGUF blocks.

    One instance is driven by one thread at a time (submit, then wait); different instances may be
    used from different threads, their calls queue on the shared pool.

    Args:
        gate, up: views of ``ffn_gate_exps`` / ``ffn_up_exps``, shape (E, I, H).
        down: view of ``ffn_down_exps``, shape (E, H, I).
        num_threads: worker threads; default :func:`default_num_threads` (never oversubscribes). All
            CPUExperts with the same count share one thread pool, so one layer runs at a time.
        copy_to_ram: copy the expert bytes into process memory (``host_memory``) instead of reading the memmap.
        lock_memory: ``mlock`` the bytes the kernels read (needs RLIMIT_MEMLOCK headroom).
        isa: row-kernel family, ``"auto"`` (best this CPU runs) or one of ``scalar``, ``avx2``, ``avx512vnni``.
        tile_isa: how experts with many tokens in a call (prefill) run, for k-quant weights: ``"auto"``
            (AMX-INT8 tiles where the CPU and OS allow them, else the row kernels), ``"amx"``,
            ``"amx-emulated"`` (the same algorithm on AVX512-VNNI, bit-identical to AMX: for tests) or
            ``"off"`` (row kernels for every expert).
        tile_min_tokens: an expert takes the tile path when it has at least this many tokens in a call
            (default: the native default, 8, measured on the lent Xeon host; see native/README.md).
    """

    def __init__(
        self,
        gate: ExpertTensorView,
        up: ExpertTensorView,
        down: ExpertTensorView,
        *,
        num_threads: int | None = None,
        copy_to_ram: bool = False,
        lock_memory: bool = False,
        isa: str = "auto",
        tile_isa: str = "auto",
        tile_min_tokens: int | None = None,
    ) -> None:
        native = load_native()
        n_expert, intermediate, hidden = (int(v) for v in gate.shape)
        _check_view("gate", gate, (n_expert, intermediate, hidden))
        _check_view("up", up, (n_expert, intermediate, hidden))
        _check_view("down", down, (n_expert, hidden, intermediate))
        if num_threads is None:
            num_threads = default_num_threads()
        elif num_threads < 1:
            raise InvalidRequestError(f"num_threads={num_threads} is invalid; allowed: an int >= 1 or None")
        if isa not in ISAS:
            raise InvalidRequestError(f"isa={isa!r} is unknown; allowed: {', '.join(ISAS)}")
        if tile_isa not in TILE_ISAS:
            raise InvalidRequestError(f"tile_isa={tile_isa!r} is unknown; allowed: {', '.join(TILE_ISAS)}")
        if tile_min_tokens is not None and tile_min_tokens < 1:
            raise InvalidRequestError(f"tile_min_tokens={tile_min_tokens} is invalid; allowed: an int >= 1 or None")
        tile_kwargs = {} if tile_min_tokens is None else {"tile_min_tokens": tile_min_tokens}
        # copy_to_ram: one page-aligned mapping per layer, which the GPU path may register for direct copies
        self.host_memory = ExpertHostMemory([v.raw for v in (gate, up, down)]) if copy_to_ram else None
        raws = list(self.host_memory.arrays) if self.host_memory is not None else [v.raw for v in (gate, up, down)]
        if lock_memory:
            for raw in raws:
                try:
                    native.lock_memory(raw)
                except ValueError as exc:
                    raise InvalidRequestError(f"lock_memory=True: {exc}") from exc
        try:
            self._runner = native.MoeRunner(
                *raws,
                int(gate.qtype),
                int(up.qtype),
                int(down.qtype),
                n_expert,
                hidden,
                intermediate,
                num_threads,
                isa,
                tile_isa,
                **tile_kwargs,
            )
        except ValueError as exc:  # a CPU that lacks the named isa or tile_isa (the message names which)
            raise InvalidRequestError(str(exc)) from exc
        self.n_expert, self.hidden, self.intermediate = n_expert, hidden, intermediate
        self._inflight: tuple[torch.Tensor, ...] | None = None

    @property
    def num_threads(self) -> int:
        return int(self._runner.num_threads)

    @property
    def isa(self) -> str:
        """The row-kernel family in use (``scalar``, ``avx2`` or ``avx512vnni``)."""
        return str(self._runner.isa)

    @property
    def tile_isa(self) -> str:
        """The tile path in use for experts with many tokens (``amx``, ``amx-emulated``, or ``off``)."""
        return str(self._runner.tile_isa)

    @property
    def last_phase_ms(self) -> dict[str, float]:
        """Wall time of the last finished call's phases in ms: ``quantize_x``, ``pack_x`` (tile path),
        ``gate_up``, ``quantize_h``, ``down``."""
        return {name: ns / 1e6 for name, ns in zip(PHASES, self._runner.phase_ns, strict=True)}

    @property
    def native_runner(self) -> object:
        """The native MoeRunner itself, for callers that drive it from native code (a CUDA host call)."""
        return self._runner

    @property
    def call_buffer_bytes(self) -> int:
        """Bytes of per-call buffers held between calls (a decode-sized call's; larger ones are freed)."""
        return int(self._runner.call_buffer_bytes)

    @property
    def tile_min_tokens(self) -> int:
        """Tokens an expert needs in a call to take the tile path."""
        return int(self._runner.tile_min_tokens)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's top-k experts: x [T, H] fp32|bf16 -> [T, H] fp32."""
        out = torch.empty(x.shape[0], self.hidden, dtype=torch.float32)
        self.submit(x, topk_ids, topk_weights, out)
        self.wait()
        return out

    def submit(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Start computing into ``out`` [T, H] fp32 and return at once; call :meth:`wait` before reading it.

        The tensors must stay unmodified until then (they are kept alive here). ``topk_ids`` is
        [T, k] int32|int64 in [0, E), or -1 to skip that (token, slot): it contributes nothing, and a
        token whose slots are all -1 gets a zero row (the rest of its experts may run elsewhere, e.g. on
        the GPU). ``topk_weights`` is [T, k] fp32.
        """
        if self._inflight is not None:
            raise InvalidRequestError("submit() called while a previous call is pending; call wait() first")
        x, topk_ids, topk_weights = self._check_inputs(x, topk_ids, topk_weights, out)
        try:
            self._runner.submit(
                x.data_ptr(),
                x.dtype == torch.bfloat16,
                topk_ids.data_ptr(),
                topk_ids.dtype == torch.int64,
                topk_weights.data_ptr(),
                out.data_ptr(),
                x.shape[0],
                topk_ids.shape[1],
            )
        except (ValueError, RuntimeError) as exc:  # a bad expert id; this thread's call pending on the shared pool
            raise InvalidRequestError(str(exc)) from exc
        self._inflight = (x, topk_ids, topk_weights, out)

    def wait(self) -> None:
        """Block until the submitted call is done (the GIL is released meanwhile)."""
        if self._inflight is None:
            raise InvalidRequestError("wait() called without a pending submit()")
        self._runner.wait()
        self._inflight = None

    def _check_inputs(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.hidden or x.dtype not in (torch.float32, torch.bfloat16):
            raise InvalidRequestError(
                f"x is {x.dtype} {tuple(x.shape)}; expected float32 or bfloat16 [T, {self.hidden}]"
            )
        num_tokens = x.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype not in (torch.int32, torch.int64):
            raise InvalidRequestError(
                f"topk_ids is {topk_ids.dtype} {tuple(topk_ids.shape)}; expected int32 or int64 [{num_tokens}, k]"
            )
        if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
            raise InvalidRequestError(
                f"topk_weights is {topk_weights.dtype} {tuple(topk_weights.shape)}; "
                f"expected float32 {tuple(topk_ids.shape)}"
            )
        if out.shape != (num_tokens, self.hidden) or out.dtype != torch.float32 or not out.is_contiguous():
            raise InvalidRequestError(
                f"out is {out.dtype} {tuple(out.shape)}; expected contiguous float32 [{num_tokens}, {self.hidden}]"
            )
        for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("out", out)):
            if t.device.type != "cpu":
                raise InvalidRequestError(f"{name} is on {t.device}; expected a CPU tensor (pinned is fine)")
        return x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
