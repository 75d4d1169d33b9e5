"""One matrix of each routed (token, slot) pair's expert times that pair's row, for experts held in GPU memory.

The experts kept on the GPU (``ksdk.offload.resident``) lie back to back in one uint8 tensor
``[n_slots, expert_bytes]``; a table ``slots`` [E] gives each expert's slot, or -1 for experts that are not
there (the CPU computes those). :func:`expert_gemv` runs one program per (N tile, pair): it looks up the
pair's expert in ``slots`` and, when resident, walks K as the decode GEMV of ``ksdk.kernels.dequant_matmul``
does (the same tile decoders, on the tensor cores); a pair whose expert is not resident does no loop and
writes zeros. Nothing depends on the host knowing which experts a batch chose, so the launch is capturable
in the decode step's graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf.constants import GGMLQuantizationType

from ksdk.kernels.dequant_matmul import _QTYPE_ID, _gemv_dot_step
from ksdk.kernels.rounding import round_to
from ksdk.weights.quants import bytes_per_row

__all__ = ["expert_gemv", "expert_gemv_reference"]

_BLOCK_N = 32
_BLOCK_K = 128
_BLOCK_M = 16  # tl.dot's smallest M: one real row, the rest masked


@triton.jit
def _expert_gemv_kernel(x_ptr, w_ptr, slots_ptr, ids_ptr, scale_ptr, out_ptr, N, K, PAIRS_PER_ROW, stride_xm,
                        stride_we, stride_wn, stride_om, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SCALE: tl.constexpr,
                        ROUND: tl.constexpr, IEEE: tl.constexpr):
    """out[p, n] = Σ_k x[p // PAIRS_PER_ROW, k] · W_e[n, k] for pair p's expert e = ids[p] when slots[e] >= 0, else 0;
    with HAS_SCALE the sum is rounded to ROUND (x's dtype) and multiplied by scale[p]."""
    pid_n, p = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + tl.load(ids_ptr + p))
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    row = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn  # [BN, 1]
    n_ok = n[:, None] < N
    x_rows = x_ptr + (p // PAIRS_PER_ROW).to(tl.int64) * stride_xm + m[:, None] * 0  # [BM, 1]: row 0 is real
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_end = tl.where(slot >= 0, K, 0)  # an expert that is not resident: no loop, zeros
    for k0 in range(0, k_end, BLOCK_K):
        acc_t = _gemv_dot_step(acc_t, row, n_ok, x_rows, m[:, None] < 1, k0, K, QTYPE, BLOCK_K, IEEE)
    y = tl.sum(acc_t, axis=1)  # [BN]: only column 0 is nonzero
    if HAS_SCALE:
        y = round_to(y, ROUND) * tl.load(scale_ptr + p)
    tl.store(out_ptr + p.to(tl.int64) * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=n < N)


def _check(x: torch.Tensor, experts: torch.Tensor, offset: int, rows: int, qtype: GGMLQuantizationType,
           slots: torch.Tensor, ids: torch.Tensor, per_pair: bool) -> None:
    if qtype not in _QTYPE_ID:
        raise ValueError(f"qtype {qtype.name} has no kernel")
    if experts.dtype != torch.uint8 or experts.dim() != 2 or not experts.is_contiguous():
        raise ValueError(f"experts is {experts.dtype} {tuple(experts.shape)}; expected contiguous uint8 "
                         f"[slots, expert_bytes]")
    if offset < 0 or offset + rows * bytes_per_row(qtype, x.shape[1]) > experts.shape[1]:
        raise ValueError(f"a {qtype.name} matrix of {rows} rows of {x.shape[1]} at byte {offset} does not fit "
                         f"experts of {experts.shape[1]} bytes")
    if slots.dtype != torch.int32 or slots.dim() != 1:
        raise ValueError(f"slots is {slots.dtype} {tuple(slots.shape)}; expected int32 [E]")
    if ids.dtype != torch.int64 or ids.dim() != 2 or not ids.is_contiguous():
        raise ValueError(f"ids is {ids.dtype} {tuple(ids.shape)}; expected contiguous int64 [T, k]")
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[0] != (ids.numel() if per_pair else ids.shape[0]):
        raise ValueError(f"x is {tuple(x.shape)}; expected [{'T·k' if per_pair else 'T'}, K] with unit stride for "
                         f"ids {tuple(ids.shape)}")
    if not (x.device == experts.device == slots.device == ids.device):
        raise ValueError("x, experts, slots and ids must be on one device")


def expert_gemv(x: torch.Tensor, experts: torch.Tensor, offset: int, rows: int, qtype: GGMLQuantizationType,
                slots: torch.Tensor, ids: torch.Tensor, *, per_pair: bool = False, scale: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """For every pair p of ``ids`` [T, k] (int64 expert ids), ``W_e @ x_p`` where W_e is the ``qtype`` matrix of
    ``rows`` rows of K = x.shape[1] values at byte ``offset`` of expert e's slot ``slots[e]`` in ``experts``
    (uint8 [n_slots, expert_bytes]), and zeros where ``slots[e]`` is -1. ``x_p`` is x[p // k] (x [T, K]), or
    x[p] with ``per_pair`` (x [T·k, K]).

    Returns [T·k, rows] in x's dtype, or, with ``scale`` ([T, k] fp32), fp32 rounded to x's dtype and times
    ``scale[p]``; written into ``out`` (contiguous rows, that shape and dtype) when given."""
    qtype = GGMLQuantizationType(qtype)
    _check(x, experts, offset, rows, qtype, slots, ids, per_pair)
    pairs = ids.numel()
    dtype = torch.float32 if scale is not None else x.dtype
    if out is None:
        out = torch.empty(pairs, rows, dtype=dtype, device=x.device)
    elif out.shape != (pairs, rows) or out.dtype != dtype or out.stride(1) != 1:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; expected {dtype} [{pairs}, {rows}], unit stride")
    if scale is not None and (scale.shape != ids.shape or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"scale is {scale.dtype} {tuple(scale.shape)}; expected contiguous float32 {tuple(ids.shape)}")
    if pairs == 0 or rows == 0:
        return out
    _expert_gemv_kernel[(triton.cdiv(rows, _BLOCK_N), pairs)](
        x, experts[:, offset:], slots, ids, scale if scale is not None else x, out, rows, x.shape[1],
        1 if per_pair else ids.shape[1], x.stride(0), experts.stride(0), bytes_per_row(qtype, x.shape[1]),
        out.stride(0), QTYPE=_QTYPE_ID[qtype], BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, BLOCK_M=_BLOCK_M,
        HAS_SCALE=scale is not None, ROUND=x.dtype, IEEE=x.dtype == torch.float32 or x.device.type == "cpu",
        num_warps=4,
    )
    return out


def expert_gemv_reference(x: torch.Tensor, experts: torch.Tensor, offset: int, rows: int,
                          qtype: GGMLQuantizationType, slots: torch.Tensor, ids: torch.Tensor, *,
                          per_pair: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`expert_gemv` in plain torch: dequantize each pair's expert matrix, multiply in fp32."""
    from ksdk.weights.quants import dequantize

    K = x.shape[1]
    nbytes = rows * bytes_per_row(qtype, K)
    flat = ids.flatten().tolist()
    out = torch.zeros(len(flat), rows, dtype=torch.float32)
    for p, e in enumerate(flat):
        slot = int(slots[e])
        if slot < 0:
            continue
        raw = experts[slot, offset : offset + nbytes].cpu().view(rows, -1)
        w = dequantize(raw, qtype, (rows, K))
        out[p] = w @ x[p if per_pair else p // ids.shape[1]].float().cpu()
    if scale is None:
        return out.to(x.dtype)
    return out.to(x.dtype).float() * scale.flatten().cpu()[:, None]
