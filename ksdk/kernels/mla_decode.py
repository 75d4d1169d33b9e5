"""Paged MLA decode attention in the absorbed form (one new token per sequence), flash-decoding style.

Per sequence b and head h, with the cache holding [c_kv | k_pe] per token:
``score[s] = scale · (q_lat[b,h] · c_kv[s] + q_pe[b,h] · k_pe[s])`` over the sequence's ``seq_lens[b]``
tokens, and ``o_lat[b,h] = Σ_s softmax(score)[s] · c_kv[s]``. The kernel splits each sequence's tokens over
``num_splits`` programs (enough to fill the GPU at small batch); each writes its normalized partial output and
log-sum-exp, and a few torch ops merge the splits. ``mla_decode_reference`` is the same math as
``MLAttention._decode`` in plain torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ksdk.kernels.launch import num_programs_wanted
from ksdk.kernels.online_softmax import online_softmax_step

__all__ = ["mla_decode", "mla_decode_reference"]

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


def mla_decode_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_pages: torch.Tensor, page_table: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Gather each sequence's latents, softmax in fp32 -> o_lat [B, H, rank] fp32."""
    rank = q_lat.shape[-1]
    page_size = kv_pages.shape[1]
    max_len = int(seq_lens.max())
    num_pages = -(-max_len // page_size)
    latent = kv_pages[page_table[:, :num_pages].long()].flatten(1, 2)[:, :max_len].float()  # [B, S, rank + rope]
    c_kv, k_pe = latent[..., :rank], latent[..., rank:]
    scores = torch.einsum("bhr,bsr->bhs", q_lat.float(), c_kv) + torch.einsum("bhp,bsp->bhs", q_pe.float(), k_pe)
    pad = torch.arange(max_len, device=scores.device)[None, :] >= seq_lens[:, None]  # [B, S]
    probs = (scores * scale).masked_fill(pad[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhs,bsr->bhr", probs, c_kv)


@triton.jit
def _mla_decode_kernel(q_lat_ptr, q_pe_ptr, kv_ptr, page_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
                       H, stride_qb, stride_qh, stride_pb, stride_ph, stride_page, stride_slot, stride_pt,
                       stride_ob, stride_oh, stride_os, stride_lb, stride_lh, scale_log2, tokens_per_split,
                       PAGE_SIZE: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                       DOT_FP32: tl.constexpr):
    b, pid_h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    h_ok = h < H
    q_lat = tl.load(q_lat_ptr + b * stride_qb + h[:, None] * stride_qh + r[None, :],
                    mask=h_ok[:, None] & (r[None, :] < RANK), other=0.0)  # [BH, BR]
    q_pe = tl.load(q_pe_ptr + b * stride_pb + h[:, None] * stride_ph + p[None, :],
                   mask=h_ok[:, None] & (p[None, :] < ROPE), other=0.0)  # [BH, BP]
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * tokens_per_split
    end = tl.minimum(seq_len, start + tokens_per_split)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max of log2-scaled scores
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):  # every chunk holds at least one token < end
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        page = tl.load(page_table_ptr + b.to(tl.int64) * stride_pt + s // PAGE_SIZE, mask=s_ok, other=0)
        slot = kv_ptr + page.to(tl.int64) * stride_page + (s % PAGE_SIZE) * stride_slot  # [BS]
        c_kv = tl.load(slot[:, None] + r[None, :], mask=s_ok[:, None] & (r[None, :] < RANK), other=0.0)  # [BS, BR]
        k_pe = tl.load(slot[:, None] + RANK + p[None, :], mask=s_ok[:, None] & (p[None, :] < ROPE), other=0.0)
        if DOT_FP32:
            c_kv = c_kv.to(tl.float32)
            scores = tl.dot(q_lat.to(tl.float32), tl.trans(c_kv), input_precision="ieee")
            scores = tl.dot(q_pe.to(tl.float32), tl.trans(k_pe.to(tl.float32)), scores, input_precision="ieee")
        else:  # half-precision cache: the queries are rounded to its dtype for the tensor cores
            scores = tl.dot(q_lat.to(c_kv.dtype), tl.trans(c_kv))
            scores = tl.dot(q_pe.to(k_pe.dtype), tl.trans(k_pe), scores)
        scores = tl.where(s_ok[None, :], scores * scale_log2, float("-inf"))  # [BH, BS]
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, scores, c_kv, DOT_FP32)

    has_tokens = end > start  # an empty split reports lse = -inf and a zero output
    out = tl.where(has_tokens, acc / tl.where(has_tokens, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_tokens, m_i * _LN2 + tl.log(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + b * stride_ob + h[:, None] * stride_oh + split * stride_os + r[None, :], out,
             mask=h_ok[:, None] & (r[None, :] < RANK))
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + split, lse, mask=h_ok)



def _check(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_pages: torch.Tensor, page_table: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    if q_lat.dim() != 3 or q_pe.dim() != 3 or q_lat.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_lat {tuple(q_lat.shape)} and q_pe {tuple(q_pe.shape)} must be [B, H, rank] and [B, H, rope]")
    B, _, rank = q_lat.shape
    rope = q_pe.shape[2]
    if kv_pages.dim() != 3 or kv_pages.shape[2] != rank + rope or kv_pages.stride(2) != 1:
        raise ValueError(f"kv_pages is {tuple(kv_pages.shape)} with strides {kv_pages.stride()}; "
                         f"expected [num_pages, page_size, {rank + rope}] with unit last stride")
    if q_lat.stride(2) != 1 or q_pe.stride(2) != 1:
        raise ValueError("q_lat and q_pe need a unit stride in their last dimension")
    if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] != B or page_table.stride(1) != 1:
        raise ValueError(f"page_table is {page_table.dtype} {tuple(page_table.shape)}; expected int32 [{B}, max_pages]")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,) or not seq_lens.is_contiguous():
        raise ValueError(f"seq_lens is {seq_lens.dtype} {tuple(seq_lens.shape)}; expected contiguous int32 [{B}]")
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("kv_pages", kv_pages)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} is {t.dtype}; allowed: float32, float16, bfloat16")
    devices = {t.device for t in (q_lat, q_pe, kv_pages, page_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"inputs are on several devices: {sorted(map(str, devices))}")


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_pages: torch.Tensor, page_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, *, max_seq_len: int, num_splits: int | None = None,
               ) -> torch.Tensor:
    """o_lat [B, H, rank] fp32 from q_lat [B, H, rank], q_pe [B, H, rope] and the page pool
    kv_pages [num_pages, page_size, rank + rope]; page_table [B, max_pages] int32, seq_lens [B] int32 (all >= 1).

    ``max_seq_len`` (>= every seq_len, known on the host) sizes the splits; ``num_splits`` defaults to enough
    programs to fill the GPU.
    """
    _check(q_lat, q_pe, kv_pages, page_table, seq_lens)
    B, H, rank = q_lat.shape
    rope = q_pe.shape[2]
    BLOCK_H, BLOCK_S = 16, 32  # a [16, rank] fp32 accumulator per program: 64 registers a thread at rank 512
    head_tiles = triton.cdiv(H, BLOCK_H)
    chunks = triton.cdiv(max(1, max_seq_len), BLOCK_S)
    if num_splits is None:
        num_splits = max(1, min(chunks, num_programs_wanted(q_lat.device) // (B * head_tiles), 64))
    num_splits = max(1, min(num_splits, chunks))
    tokens_per_split = triton.cdiv(chunks, num_splits) * BLOCK_S
    num_splits = triton.cdiv(max(1, max_seq_len), tokens_per_split)
    o_part = torch.empty(B, H, num_splits, rank, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_lat.device)
    _mla_decode_kernel[(B, head_tiles, num_splits)](
        q_lat, q_pe, kv_pages, page_table, seq_lens, o_part, lse,
        H, q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv_pages.stride(0), kv_pages.stride(1),
        page_table.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        scale * _LOG2E, tokens_per_split,
        PAGE_SIZE=kv_pages.shape[1], RANK=rank, ROPE=rope, BLOCK_H=BLOCK_H, BLOCK_S=BLOCK_S,
        BLOCK_R=_pow2(rank), BLOCK_P=_pow2(rope),
        # Triton's CPU interpreter gets half-precision tl.dot wrong (triton 3.9): it computes in fp32 there.
        DOT_FP32=kv_pages.dtype == torch.float32 or not kv_pages.is_cuda,
    )
    if num_splits == 1:
        return o_part[:, :, 0]
    weights = torch.softmax(lse, dim=-1)  # [B, H, splits]: each split's share of the total exp-sum
    return torch.einsum("bhs,bhsr->bhr", weights, o_part)
