"""Multi-head Latent Attention over a paged latent cache (DESIGN.md §5).

The cache holds only [c_kv | k_pe] (kv_lora_rank + rope_dim values) per token per layer. Prefill expands
the context's latents into per-head keys and values (the naive form); decode uses the absorbed form:
q_nope·W_kb scores a 512-vector against c_kv directly and W_vb maps the weighted c_kv back out.

On a GPU, decode batches are replayed from CUDA graphs: normally the whole model step
(``ksdk.models.decode_graph``, which calls :meth:`MLAttention.decode_step`); where that cannot be captured
(routed experts in torch), each layer's attention alone (about 50 kernels) is captured once per batch size
and length bucket: at batch 1 the launches, not the bytes, were most of its time.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.layers.linear import Linear
from ksdk.layers.norm import RMSNorm
from ksdk.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from ksdk.models.config import ModelConfig

__all__ = ["GRAPH_MAX_BATCH", "GRAPH_POOL", "MLAttention", "copy_page_table", "length_bucket"]

GRAPH_MAX_BATCH = 32  # decode batches up to this size are replayed from CUDA graphs (one per size and bucket)


class _GraphPool:
    """One CUDA graph memory pool for every layer's captures: graphs replay one after another, so their
    intermediates can share memory (each graph's output buffer stays its own).

    The pool also holds a one-kernel anchor graph: torch releases a private pool once no graph uses it, and
    a later capture into the released pool's handle fails an internal assert (all graphs dropped, e.g. for
    a new KV cache, then one captured again)."""

    def __init__(self) -> None:
        self._handle: object | None = None
        self._anchor: torch.cuda.CUDAGraph | None = None

    @property
    def handle(self) -> object:
        if self._handle is None:
            handle = torch.cuda.graph_pool_handle()
            anchor = torch.cuda.CUDAGraph()
            with torch.cuda.graph(anchor, pool=handle):
                torch.zeros(1, device="cuda")
            self._handle, self._anchor = handle, anchor
        return self._handle


GRAPH_POOL = _GraphPool()  # shared by the attention graphs here and the whole-step graphs


def length_bucket(max_len: int) -> int:
    """Sequence lengths a captured decode serves: up to the next power of two (at least 256)."""
    return max(256, 1 << (max_len - 1).bit_length())


def copy_page_table(static: torch.Tensor, page_table: torch.Tensor) -> None:
    """Fill a captured graph's page table; pages past its width are never read (every sequence is within
    the graph's length bucket)."""
    width = min(static.shape[1], page_table.shape[1])
    static[:, :width].copy_(page_table[:, :width])


class _CapturedDecode:
    """One layer's decode attention for one batch size and length bucket, captured as a CUDA graph.

    Inputs are copied into static buffers before each replay; the output is a static buffer that the next
    replay of this graph overwrites (the caller adds it to the residual at once)."""

    def __init__(self, attn: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 meta: AttentionMetadata, kv_pages: torch.Tensor, max_seq_len: int) -> None:
        self.x, self.cos, self.sin = x.clone(), cos.clone(), sin.clone()
        pages = -(-max_seq_len // meta.page_size)  # the page table is as wide as the bucket needs
        page_table = meta.page_table.new_zeros(x.shape[0], pages)
        copy_page_table(page_table, meta.page_table)
        self.meta = dataclasses.replace(meta, seq_lens=meta.seq_lens.clone(), page_table=page_table,
                                        slot_mapping=meta.slot_mapping.clone())

        def run() -> torch.Tensor:
            return attn._attend(self.x, self.cos, self.sin, self.meta, kv_pages, max_seq_len)

        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up outside the capture: compiles kernels, sets up cuBLAS
            run()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=GRAPH_POOL.handle):
            self.out = run()

    def replay(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.x.copy_(x)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.meta.seq_lens.copy_(meta.seq_lens)
        copy_page_table(self.meta.page_table, meta.page_table)
        self.meta.slot_mapping.copy_(meta.slot_mapping)
        self.graph.replay()
        return self.out


class MLAttention(torch.nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        q_proj: Linear | None,  # no q low-rank path (V2-Lite)
        q_a: Linear | None,
        q_a_norm: RMSNorm | None,
        q_b: Linear | None,
        kv_a: Linear,
        kv_a_norm: RMSNorm,
        w_kb: torch.Tensor,  # [heads, qk_nope, kv_lora_rank]
        w_vb: torch.Tensor,  # [heads, v_head, kv_lora_rank]
        o_proj: Linear,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.nope, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.rank, self.v_dim = config.kv_lora_rank, config.v_head_dim
        self.scale = config.softmax_scale
        self.q_proj, self.q_a, self.q_a_norm, self.q_b = q_proj, q_a, q_a_norm, q_b
        self.kv_a, self.kv_a_norm, self.o_proj = kv_a, kv_a_norm, o_proj
        self.register_buffer("w_kb", w_kb, persistent=False)
        self.register_buffer("w_vb", w_vb, persistent=False)
        # Decode batches on a GPU replay per-layer attention graphs (_CapturedDecode) when no whole-step graph
        # runs; DeepseekForCausalLM.cuda_graphs sets this.
        self.use_cuda_graphs = True
        self._graphs: dict[tuple[int, ...], _CapturedDecode] = {}  # (batch, bucket, cache address and shape)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, rope/2]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_pages: torch.Tensor,  # [num_pages, page_size, rank + rope]
    ) -> torch.Tensor:
        B = x.shape[0]
        if (self.use_cuda_graphs and kv_pages.is_cuda and meta.is_decode and B <= GRAPH_MAX_BATCH
                and not torch.cuda.is_current_stream_capturing()):
            bucket = length_bucket(max(meta.seq_lens_host))
            key = (B, bucket, kv_pages.data_ptr(), *kv_pages.shape)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = _CapturedDecode(self, x, cos, sin, meta, kv_pages, bucket)
            return graph.replay(x, cos, sin, meta)
        return self._attend(x, cos, sin, meta, kv_pages, max(meta.seq_lens_host))

    def clear_graphs(self) -> None:
        """Drop the captured attention graphs (their memory returns to the shared pool)."""
        self._graphs.clear()

    def decode_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                    kv_pages: torch.Tensor, max_seq_len: int,
                    side_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """Decode attention as stream-ordered work only, for a captured whole step: ``max_seq_len`` is the
        graph's length bucket, the same one the per-layer graphs use (so the kernels split alike). With
        ``side_stream`` the latent projection (kv_a) runs there, beside the query's two projections."""
        return self._attend(x, cos, sin, meta, kv_pages, max_seq_len, side_stream)

    def _attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv_pages: torch.Tensor, max_seq_len: int,
                side_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """The attention itself; ``max_seq_len`` (>= every sequence's length) sizes the decode kernel's splits."""
        T = x.shape[0]
        if side_stream is not None:  # fork: kv_a needs only x, as q_a does
            main = torch.cuda.current_stream(x.device)
            side_stream.wait_stream(main)
            with torch.cuda.stream(side_stream):
                kv = self.kv_a(x)  # [T, rank + rope]
        q = self.q_proj(x) if self.q_proj is not None else self.q_b(self.q_a_norm(self.q_a(x)))
        q = q.view(T, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)  # [T, H, nope], [T, H, rope]
        if side_stream is None:
            kv = self.kv_a(x)  # [T, rank + rope]
        else:
            main.wait_stream(side_stream)  # join
        if kv_pages.is_cuda:  # the same roundings in two launches instead of about 25
            from ksdk.kernels.latent_cache import write_latent
            from ksdk.kernels.rotary import rotary_

            rotary_(q_pe, cos, sin)  # in place: q is this step's own projection
            write_latent(kv, self.kv_a_norm.weight, self.kv_a_norm.eps, cos, sin, kv_pages, meta.slot_mapping)
        else:
            q_pe = RotaryEmbedding.apply(q_pe, cos, sin)
            c_kv = self.kv_a_norm(kv[:, : self.rank])
            k_pe = RotaryEmbedding.apply(kv[:, self.rank :], cos, sin)
            latent = torch.cat((c_kv, k_pe), dim=-1)  # [T, rank + rope]
            kv_pages.view(-1, latent.shape[-1])[meta.slot_mapping] = latent.to(kv_pages.dtype)

        if meta.is_decode:
            out = self._decode(q_nope, q_pe, meta, kv_pages, max_seq_len)
        else:
            out = self._prefill(q_nope, q_pe, meta, kv_pages)
        return self.o_proj(out.reshape(T, self.num_heads * self.v_dim).to(x.dtype))

    def _gather(self, kv_pages: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
        """[B, max_pages] page ids -> [B, length, rank + rope] latents, in fp32."""
        num_pages = -(-length // kv_pages.shape[1])
        pages = kv_pages[page_table[:, :num_pages].long()]  # [B, num_pages, page_size, D]
        return pages.flatten(1, 2)[:, :length].float()

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata,
                kv_pages: torch.Tensor, max_len: int) -> torch.Tensor:
        """Absorbed form, one new token per sequence: q_nope [B, H, nope] -> [B, H, v]."""
        if kv_pages.is_cuda:  # the same math as below, paged and split over the sequence in one Triton kernel
            from ksdk.kernels.mla_decode import mla_decode

            # In the weights' dtype (fp32 accumulation inside): an fp32 copy of W_kb and W_vb per step would
            # cost more than the attention itself.
            w_dtype = self.w_kb.dtype
            q_lat = torch.einsum("bhn,hnr->bhr", q_nope.to(w_dtype), self.w_kb)  # [B, H, rank]
            o_lat = mla_decode(q_lat, q_pe, kv_pages, meta.page_table, meta.seq_lens, self.scale, max_seq_len=max_len)
            return torch.einsum("bhr,hvr->bhv", o_lat.to(w_dtype), self.w_vb)
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope.float(), self.w_kb.float())  # [B, H, rank]
        latent = self._gather(kv_pages, meta.page_table, max_len)  # [B, S, rank + rope]
        c_kv, k_pe = latent[..., : self.rank], latent[..., self.rank :]
        scores = torch.einsum("bhr,bsr->bhs", q_lat, c_kv) + torch.einsum("bhp,bsp->bhs", q_pe.float(), k_pe)
        pad = torch.arange(max_len, device=scores.device)[None, :] >= meta.seq_lens[:, None]  # [B, S]
        probs = (scores * self.scale).masked_fill(pad[:, None, :], float("-inf")).softmax(dim=-1)
        o_lat = torch.einsum("bhs,bsr->bhr", probs, c_kv)  # [B, H, rank]
        return torch.einsum("bhr,hvr->bhv", o_lat, self.w_vb.float())

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata,
                 kv_pages: torch.Tensor) -> torch.Tensor:
        """Naive form: expand the context's latents to per-head k and v, then causal attention."""
        if kv_pages.is_cuda:  # one flash-attention launch for the batch; no [H, Q, S] scores in memory
            from ksdk.kernels.mla_prefill import expand_context, mla_prefill

            ctx = expand_context(kv_pages, meta.page_table, meta.seq_lens, meta.seq_lens_host, self.w_kb, self.w_vb)
            return mla_prefill(q_nope, q_pe, ctx.k_nope, ctx.k_pe, ctx.v, meta.query_start_loc, ctx.kv_start_loc,
                               self.scale, max_query_len=max(meta.query_lens_host))
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim, dtype=torch.float32)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            latent = self._gather(kv_pages, meta.page_table[i : i + 1], seq_len)[0]  # [S, rank + rope]
            c_kv, k_pe = latent[:, : self.rank], latent[:, self.rank :]
            k_nope = torch.einsum("sr,hnr->hsn", c_kv, self.w_kb.float())  # [H, S, nope]
            v = torch.einsum("sr,hvr->hsv", c_kv, self.w_vb.float())  # [H, S, v]
            qn = q_nope[start : start + q_len].float().transpose(0, 1)  # [H, Q, nope]
            qp = q_pe[start : start + q_len].float().transpose(0, 1)  # [H, Q, rope]
            scores = qn @ k_nope.transpose(1, 2) + qp @ k_pe.T  # [H, Q, S]
            query_pos = torch.arange(seq_len - q_len, seq_len, device=scores.device)
            future = torch.arange(seq_len, device=scores.device)[None, :] > query_pos[:, None]  # [Q, S]
            probs = (scores * self.scale).masked_fill(future, float("-inf")).softmax(dim=-1)
            out[start : start + q_len] = (probs @ v).transpose(0, 1)
            start += q_len
        return out
