"""Causal MLA prefill attention over expanded keys and values, flash-attention style (one launch per batch).

Prefill expands each sequence's cached latents into per-head keys and values (``expand_context``: two GEMMs
in the weights' dtype), then attends with online softmax and fp32 accumulation, never materializing the
[H, Q, S] scores. Per head h, query token t of sequence b and context token s:
``score = scale · (q_nope[t,h] · k_nope[s,h] + q_pe[t,h] · k_pe[s])`` (k_pe is one head shared by all),
``out[t,h] = Σ_s softmax(score)[s] · v[s,h]`` over s up to the query's context position. Sequence b's new
tokens are rows ``query_start_loc[b]:query_start_loc[b+1]`` of q, its context rows
``kv_start_loc[b]:kv_start_loc[b+1]`` of k and v, and its query i sits at context position
``seq_len - q_len + i`` (the prefix already cached comes first). ``mla_prefill_reference`` is the same math
in plain torch, the way ``MLAttention._prefill`` computes it on the CPU.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ksdk.kernels.online_softmax import online_softmax_step

__all__ = [
    "ExpandedContext", "PrefillConfig", "default_config", "expand_context", "mla_prefill", "mla_prefill_reference",
]

_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tile sizes and launch settings of the prefill kernel."""

    block_m: int = 128  # query tokens per program
    block_n: int = 64  # context tokens per loop step
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"PrefillConfig.{name} is {value}; allowed: a power of two >= 16")


def default_config(dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """Half precision on a GPU: 128x64 tiles; fp32 needs twice the shared memory per tile, so smaller ones.
    Triton's interpreter: 16x16 tiles, so small test shapes still cover several blocks and the causal edge."""
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillConfig()


@dataclasses.dataclass(frozen=True)
class ExpandedContext:
    """Every sequence's context expanded to per-head keys and values, concatenated over the batch."""

    k_nope: torch.Tensor  # [S_total, H, nope], the weights' dtype
    k_pe: torch.Tensor  # [S_total, rope], the cache's dtype (a view into the gathered latents)
    v: torch.Tensor  # [S_total, H, v], the weights' dtype
    kv_start_loc: torch.Tensor  # [B+1] int32: sequence b's context is rows kv_start_loc[b]:kv_start_loc[b+1]


def expand_context(kv_pages: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                   seq_lens_host: tuple[int, ...], w_kb: torch.Tensor, w_vb: torch.Tensor) -> ExpandedContext:
    """Gather the batch's latents from the page pool [num_pages, page_size, rank + rope] and expand them:
    k_nope = c_kv · W_kb, v = c_kv · W_vb, one GEMM each for the whole batch in W's dtype.

    ``page_table`` [B, max_pages] int32 and ``seq_lens`` [B] int32 on the pool's device; ``seq_lens_host``
    the same lengths on the host (they size the outputs, so nothing waits for the device);
    w_kb [H, nope, rank], w_vb [H, v, rank].
    """
    H, nope, rank = w_kb.shape
    v_dim = w_vb.shape[1]
    page_size = kv_pages.shape[1]
    device = kv_pages.device
    total = sum(seq_lens_host)
    kv_start_loc = torch.zeros(len(seq_lens_host) + 1, dtype=torch.int32, device=device)
    torch.cumsum(seq_lens, dim=0, dtype=torch.int32, out=kv_start_loc[1:])
    seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens_host), device=device), seq_lens.long(),
                                      output_size=total)  # [S_total]
    pos = torch.arange(total, device=device) - kv_start_loc[seq_ids]  # context position of each row
    slots = page_table[seq_ids, pos // page_size].long() * page_size + pos % page_size
    latent = kv_pages.view(-1, kv_pages.shape[-1])[slots]  # [S_total, rank + rope]
    c_kv = latent[:, :rank].to(w_kb.dtype)
    k_nope = (c_kv @ w_kb.reshape(H * nope, rank).T).view(total, H, nope)
    v = (c_kv @ w_vb.reshape(H * v_dim, rank).T).view(total, H, v_dim)
    return ExpandedContext(k_nope=k_nope, k_pe=latent[:, rank:], v=v, kv_start_loc=kv_start_loc)


def mla_prefill_reference(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                          v: torch.Tensor, query_start_loc: torch.Tensor, kv_start_loc: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Per sequence in fp32 with the full causal score matrix -> out [T, H, v] fp32."""
    out = torch.empty(q_nope.shape[0], q_nope.shape[1], v.shape[2], dtype=torch.float32, device=q_nope.device)
    qsl, ksl = query_start_loc.tolist(), kv_start_loc.tolist()
    for q0, q1, k0, k1 in zip(qsl[:-1], qsl[1:], ksl[:-1], ksl[1:]):
        qn = q_nope[q0:q1].float().transpose(0, 1)  # [H, Q, nope]
        qp = q_pe[q0:q1].float().transpose(0, 1)  # [H, Q, rope]
        kn = k_nope[k0:k1].float().permute(1, 2, 0)  # [H, nope, S]
        scores = qn @ kn + qp @ k_pe[k0:k1].float().T  # [H, Q, S]
        q_len, seq_len = q1 - q0, k1 - k0
        query_pos = torch.arange(seq_len - q_len, seq_len, device=scores.device)
        future = torch.arange(seq_len, device=scores.device)[None, :] > query_pos[:, None]  # [Q, S]
        probs = (scores * scale).masked_fill(future, float("-inf")).softmax(dim=-1)
        out[q0:q1] = (probs @ v[k0:k1].float().transpose(0, 1)).transpose(0, 1)
    return out


@triton.jit
def _attend_keys(acc, l_i, m_i, q_n, q_p, kn_ptr, kp_ptr, v_ptr, kv0, h, n0, end, q_pos,
                 stride_kn_s, stride_kn_h, stride_kp_s, stride_v_s, stride_v_h, scale_log2,
                 NOPE: tl.constexpr, ROPE: tl.constexpr, VDIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One step of online softmax over context tokens n0 .. n0 + BLOCK_N (masked: the causal edge)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows = (kv0 + offs_n).to(tl.int64)
    dn = tl.arange(0, NOPE)
    dp = tl.arange(0, ROPE)
    dv = tl.arange(0, VDIM)
    kn_ptrs = kn_ptr + rows[:, None] * stride_kn_s + h * stride_kn_h + dn[None, :]  # [BN, nope]
    kp_ptrs = kp_ptr + rows[:, None] * stride_kp_s + dp[None, :]  # [BN, rope]
    v_ptrs = v_ptr + rows[:, None] * stride_v_s + h * stride_v_h + dv[None, :]  # [BN, v]
    if MASKED:
        n_ok = offs_n < end
        k_n = tl.load(kn_ptrs, mask=n_ok[:, None], other=0.0)
        k_p = tl.load(kp_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        k_n = tl.load(kn_ptrs)
        k_p = tl.load(kp_ptrs)
        v = tl.load(v_ptrs)
    if DOT_FP32:
        v = v.to(tl.float32)
        scores = tl.dot(q_n, tl.trans(k_n.to(tl.float32)), input_precision="ieee")
        scores = tl.dot(q_p, tl.trans(k_p.to(tl.float32)), scores, input_precision="ieee")
    else:
        scores = tl.dot(q_n, tl.trans(k_n))
        scores = tl.dot(q_p, tl.trans(k_p.to(k_n.dtype)), scores)
    scores = scores * scale_log2  # [BM, BN], log2 units
    if MASKED:
        scores = tl.where(offs_n[None, :] <= q_pos[:, None], scores, float("-inf"))
    # Key 0 is in the first step and visible to every query row, so the running max is finite from then on.
    return online_softmax_step(acc, l_i, m_i, scores, v, DOT_FP32)


@triton.jit
def _mla_prefill_kernel(qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, o_ptr, q_start_ptr, kv_start_ptr,
                        stride_qn_t, stride_qn_h, stride_qp_t, stride_qp_h, stride_kn_s, stride_kn_h, stride_kp_s,
                        stride_v_s, stride_v_h, stride_o_t, stride_o_h, scale_log2,
                        NOPE: tl.constexpr, ROPE: tl.constexpr, VDIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query blocks see the most keys: start them first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0 = tl.load(q_start_ptr + b)
    q_len = tl.load(q_start_ptr + b + 1) - q0
    m_start = m_block * BLOCK_M
    if m_start >= q_len:  # a shorter sequence than the batch's longest
        return
    kv0 = tl.load(kv_start_ptr + b)
    prefix = tl.load(kv_start_ptr + b + 1) - kv0 - q_len  # context tokens before the first new one

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    q_rows = (q0 + offs_m).to(tl.int64)
    dn = tl.arange(0, NOPE)
    dp = tl.arange(0, ROPE)
    dv = tl.arange(0, VDIM)
    q_n = tl.load(qn_ptr + q_rows[:, None] * stride_qn_t + h * stride_qn_h + dn[None, :], mask=m_ok[:, None], other=0.0)
    q_p = tl.load(qp_ptr + q_rows[:, None] * stride_qp_t + h * stride_qp_h + dp[None, :], mask=m_ok[:, None], other=0.0)
    if DOT_FP32:
        q_n = q_n.to(tl.float32)
        q_p = q_p.to(tl.float32)
    else:  # the queries are rounded to the keys' dtype for the tensor cores
        q_n = q_n.to(kn_ptr.dtype.element_ty)
        q_p = q_p.to(kn_ptr.dtype.element_ty)
    q_pos = prefix + offs_m  # context position of each query row

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, VDIM), dtype=tl.float32)
    # Context tokens up to prefix + m_start are visible to every row of the block: whole steps need no mask.
    unmasked_end = (prefix + m_start + 1) // BLOCK_N * BLOCK_N
    end = prefix + tl.minimum(m_start + BLOCK_M, q_len)  # one past the last row's own position
    for n0 in range(0, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q_n, q_p, kn_ptr, kp_ptr, v_ptr, kv0, h, n0, end, q_pos,
                                     stride_kn_s, stride_kn_h, stride_kp_s, stride_v_s, stride_v_h, scale_log2,
                                     NOPE, ROPE, VDIM, BLOCK_N, False, DOT_FP32)
    for n0 in range(unmasked_end, end, BLOCK_N):
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q_n, q_p, kn_ptr, kp_ptr, v_ptr, kv0, h, n0, end, q_pos,
                                     stride_kn_s, stride_kn_h, stride_kp_s, stride_v_s, stride_v_h, scale_log2,
                                     NOPE, ROPE, VDIM, BLOCK_N, True, DOT_FP32)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_o_t + h * stride_o_h + dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None])


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
           query_start_loc: torch.Tensor, kv_start_loc: torch.Tensor) -> None:
    if q_nope.dim() != 3 or q_pe.dim() != 3 or q_nope.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_nope {tuple(q_nope.shape)} and q_pe {tuple(q_pe.shape)} must be [T, H, nope] "
                         "and [T, H, rope]")
    T, H, nope = q_nope.shape
    rope = q_pe.shape[2]
    if k_nope.dim() != 3 or k_nope.shape[1:] != (H, nope):
        raise ValueError(f"k_nope is {tuple(k_nope.shape)}; expected [S, {H}, {nope}]")
    S = k_nope.shape[0]
    if k_pe.shape != (S, rope):
        raise ValueError(f"k_pe is {tuple(k_pe.shape)}; expected [{S}, {rope}] (one rope head shared by all)")
    if v.dim() != 3 or v.shape[:2] != (S, H):
        raise ValueError(f"v is {tuple(v.shape)}; expected [{S}, {H}, v_dim]")
    for name, dim in (("nope", nope), ("rope", rope), ("v", v.shape[2])):
        if dim < 16 or dim & (dim - 1):
            raise ValueError(f"head dim {name} is {dim}; allowed: a power of two >= 16 (tl.dot tiles)")
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} is {t.dtype}; allowed: float32, float16, bfloat16")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} has strides {t.stride()}; its last dimension needs unit stride")
    if k_nope.dtype != v.dtype:
        raise ValueError(f"k_nope is {k_nope.dtype} but v is {v.dtype}; they must match")
    B = query_start_loc.shape[0] - 1
    for name, t in (("query_start_loc", query_start_loc), ("kv_start_loc", kv_start_loc)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] != B + 1 or not t.is_contiguous() or B < 1:
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}; expected contiguous int32 [B+1] with B >= 1, "
                             f"B = {B} from query_start_loc")
    devices = {t.device for t in (q_nope, q_pe, k_nope, k_pe, v, query_start_loc, kv_start_loc)}
    if len(devices) != 1:
        raise ValueError(f"inputs are on several devices: {sorted(map(str, devices))}")


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                v: torch.Tensor, query_start_loc: torch.Tensor, kv_start_loc: torch.Tensor, scale: float, *,
                max_query_len: int, out_dtype: torch.dtype | None = None, config: PrefillConfig | None = None,
                ) -> torch.Tensor:
    """Causal attention of a batch's new tokens over their whole contexts -> out [T, H, v] in ``out_dtype``
    (default: q_nope's), accumulated in fp32.

    q_nope [T, H, nope], q_pe [T, H, rope] (rotated); k_nope [S, H, nope], k_pe [S, rope], v [S, H, v];
    query_start_loc and kv_start_loc [B+1] int32 on the same device, with every sequence's context at least
    as long as its new tokens. ``max_query_len`` (the longest sequence's new tokens, known on the host) sizes
    the grid. Half-precision keys round the queries (and the softmax weights) to their dtype for the tensor
    cores; fp32 keys are computed in full fp32.
    """
    _check(q_nope, q_pe, k_nope, k_pe, v, query_start_loc, kv_start_loc)
    T, H, nope = q_nope.shape
    B = query_start_loc.shape[0] - 1
    v_dim = v.shape[2]
    if config is None:
        config = default_config(k_nope.dtype, q_nope.device)
    out = torch.empty(T, H, v_dim, dtype=out_dtype or q_nope.dtype, device=q_nope.device)
    if T == 0:
        return out
    grid = (triton.cdiv(max_query_len, config.block_m), H, B)
    _mla_prefill_kernel[grid](
        q_nope, q_pe, k_nope, k_pe, v, out, query_start_loc, kv_start_loc,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1), scale * _LOG2E,
        NOPE=nope, ROPE=q_pe.shape[2], VDIM=v_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        # Triton's CPU interpreter gets half-precision tl.dot wrong (triton 3.9): it computes in fp32 there.
        DOT_FP32=k_nope.dtype == torch.float32 or not k_nope.is_cuda,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
