"""DeepSeek-V2/V3/R1 as a composition of ksdk.layers, built from a GGUF file."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch

from ksdk.errors import InvalidRequestError, UnsupportedQuantError
from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.layers.embedding import Embedding
from ksdk.layers.linear import MLP, Linear, load_dense
from ksdk.layers.mla import MLAttention
from ksdk.layers.moe import MoE, MoEStepContext, Router, build_routed_experts, gpu_streaming
from ksdk.layers.norm import RMSNorm
from ksdk.layers.rotary import RotaryEmbedding
from ksdk.models.config import ModelConfig
from ksdk.models.decode_graph import DecodeGraphs
from ksdk.offload.options import ExpertOptions
from ksdk.weights.quants import SUPPORTED_QTYPES

if TYPE_CHECKING:
    from ksdk.offload.gpu_experts import ExpertStaging, StreamCrossover
    from ksdk.weights.gguf_file import GGUFFile, TensorView

__all__ = ["CUDA_GRAPH_MODES", "CudaGraphMode", "DecoderLayer", "DeepseekForCausalLM"]

logger = logging.getLogger(__name__)

CudaGraphMode = Literal["step", "attention", "off"]
CUDA_GRAPH_MODES: tuple[CudaGraphMode, ...] = ("step", "attention", "off")


class DecoderLayer(torch.nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: MLAttention, ffn_norm: RMSNorm, ffn: MLP | MoE) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv_pages: torch.Tensor) -> torch.Tensor:
        x, h = self.ffn_norm.add_and_norm(x, self.attn(self.attn_norm(x), cos, sin, meta, kv_pages))
        return x + self.ffn(h)

    def decode_step(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                    meta: AttentionMetadata, kv_pages: torch.Tensor, max_seq_len: int,
                    ctx: MoEStepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """forward() for a captured decode step: stream-ordered work only, attention sized for the bucket.

        Residual adds are deferred so that each fuses with the norm after it (one launch on a GPU): the layer's
        input is ``x + delta`` (``delta`` None for the first layer), and it returns (input after attention,
        ffn output), whose sum is its output."""
        x, h = (x, self.attn_norm(x)) if delta is None else self.attn_norm.add_and_norm(x, delta)
        x, h = self.ffn_norm.add_and_norm(x, self.attn.decode_step(h, cos, sin, meta, kv_pages, max_seq_len,
                                                                           ctx.side_stream))
        return x, (self.ffn.decode_step(h, ctx) if isinstance(self.ffn, MoE) else self.ffn(h))


class DeepseekForCausalLM(torch.nn.Module):
    """The whole model. ``forward`` runs one engine step over a flat batch of new tokens.

    On a GPU, ``cuda_graphs`` picks how decode batches (one new token per sequence, up to 32 sequences) run:
    ``"step"`` (default) replays the whole step from one CUDA graph with the routed experts as host nodes,
    falling back to ``"attention"`` where the routed experts are not native; ``"attention"`` replays only
    each layer's attention from a graph; ``"off"`` launches everything eagerly. Other batches run eagerly.
    """

    def __init__(self, config: ModelConfig, embed: Embedding, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: Linear, device: torch.device, kv_dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.embed = embed
        self.layers = torch.nn.ModuleList(layers)
        self.norm, self.lm_head = norm, lm_head
        self.rotary = RotaryEmbedding(config).to(device)
        self.device, self.kv_dtype = device, kv_dtype
        self.decode_graphs = DecodeGraphs(self) if self.device.type == "cuda" else None
        self._cuda_graphs: CudaGraphMode = "step"

    @property
    def cuda_graphs(self) -> CudaGraphMode:
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, mode: CudaGraphMode) -> None:
        if mode not in CUDA_GRAPH_MODES:
            raise InvalidRequestError(f"cuda_graphs={mode!r}; allowed: {', '.join(CUDA_GRAPH_MODES)}")
        self._cuda_graphs = mode
        for layer in self.layers:
            layer.attn.use_cuda_graphs = mode != "off"

    def clear_cuda_graphs(self) -> None:
        """Drop every captured graph (needed after swapping a layer's modules or routed experts)."""
        if self.decode_graphs is not None:
            self.decode_graphs.clear()
        for layer in self.layers:
            layer.attn.clear_graphs()

    @property
    def kv_cache_dim(self) -> int:
        return self.config.kv_cache_dim

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """[T] ids and positions -> [B, vocab] fp32 logits at each sequence's last new token."""
        x = self.embed(input_ids)  # [T, hidden]
        graphs = self.decode_graphs
        if self._cuda_graphs == "step" and graphs is not None and graphs.serves(meta):
            return graphs.run(x, positions, meta, kv_cache)
        cos, sin = self.rotary.cos_sin(positions)
        for layer, kv_pages in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, meta, kv_pages)
        x = self.norm(x[meta.logits_indices])
        return self.lm_head(x).float()

    def decode_step(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                    kv_cache: list[torch.Tensor], max_seq_len: int, ctx: MoEStepContext) -> torch.Tensor:
        """The body of a captured decode step (see ksdk.models.decode_graph): x [B, hidden] after the
        embedding, one token per sequence -> [B, vocab] fp32 logits. Stream-ordered work only."""
        cos, sin = self.rotary.cos_sin(positions)
        delta = None
        for layer, kv_pages in zip(self.layers, kv_cache):
            x, delta = layer.decode_step(x, delta, cos, sin, meta, kv_pages, max_seq_len, ctx)
        h = self.norm(x) if delta is None else self.norm.add_and_norm(x, delta)[1]
        return self.lm_head(h).float()  # one token per sequence: every row is a last token

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  kv_dtype: torch.dtype | None = None, experts: ExpertOptions | str = "auto") -> DeepseekForCausalLM:
        """Build from an open GGUF file; ``experts`` is an ExpertOptions or just its backend name.

        On CUDA the non-expert weights stay in their GGUF blocks (QuantLinear) and native experts still run on
        the CPU, except for batches long enough that streaming them to the GPU is faster
        (``experts.gpu_stream_threshold``)."""
        experts = experts if isinstance(experts, ExpertOptions) else ExpertOptions(backend=experts)  # type: ignore[arg-type]
        config = ModelConfig.from_gguf(gguf.metadata)
        _check_qtypes(gguf)
        device = torch.device(device)

        def dense(name: str) -> torch.Tensor:
            return load_dense(gguf.tensor(name), device, dtype)

        def linear(name: str) -> Linear:
            if device.type == "cuda":  # weights stay in their GGUF blocks on the GPU
                from ksdk.layers.quant_linear import quant_linear

                return quant_linear(gguf.tensor(name), device, dtype)  # type: ignore[return-value]
            return Linear(dense(name))

        def norm(name: str) -> RMSNorm:
            return RMSNorm(dense(name).float().to(dtype), config.rms_norm_eps)

        streaming = gpu_streaming(device, experts)
        resident = _resident_counts(config, gguf, device, experts)
        layers = [
            DecoderLayer(norm(f"blk.{i}.attn_norm.weight"), _attention(config, gguf, i, linear, norm, dense),
                         norm(f"blk.{i}.ffn_norm.weight"), _ffn(config, gguf, i, linear, device, dtype, experts,
                                                                streaming, resident.get(i, 0)))
            for i in range(config.num_layers)
        ]
        head = "output.weight" if gguf.has("output.weight") else "token_embd.weight"  # tied embeddings
        return cls(config, Embedding(gguf.tensor("token_embd.weight"), device, dtype), layers,
                   norm("output_norm.weight"), linear(head), device, kv_dtype or dtype)


def _check_qtypes(gguf: GGUFFile) -> None:
    """Refuse at load, not at the first forward that touches an expert, any tensor type without a kernel."""
    for name in gguf.tensor_names:
        qtype = gguf.tensor(name).qtype
        if qtype not in SUPPORTED_QTYPES:
            raise UnsupportedQuantError(name, qtype.name, sorted(q.name for q in SUPPORTED_QTYPES))


def _attention(config: ModelConfig, gguf: GGUFFile, i: int, linear, norm, dense) -> MLAttention:  # noqa: ANN001
    p = f"blk.{i}."
    H, nope, v, rank = config.num_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    if gguf.has(p + "attn_kv_b.weight"):
        kv_b = dense(p + "attn_kv_b.weight").view(H, nope + v, rank)  # [H*(nope+v), rank] per head
        w_kb, w_vb = kv_b[:, :nope], kv_b[:, nope:]
    else:
        # Split layout as llama.cpp's converter writes it: k_b [H, rank, nope] (transposed), v_b [H, v, rank].
        w_kb = dense(p + "attn_k_b.weight").view(H, rank, nope).transpose(1, 2)
        w_vb = dense(p + "attn_v_b.weight").view(H, v, rank)
    low_rank = config.q_lora_rank > 0
    return MLAttention(
        config,
        q_proj=None if low_rank else linear(p + "attn_q.weight"),
        q_a=linear(p + "attn_q_a.weight") if low_rank else None,
        q_a_norm=norm(p + "attn_q_a_norm.weight") if low_rank else None,
        q_b=linear(p + "attn_q_b.weight") if low_rank else None,
        kv_a=linear(p + "attn_kv_a_mqa.weight"),
        kv_a_norm=norm(p + "attn_kv_a_norm.weight"),
        w_kb=w_kb.contiguous(),
        w_vb=w_vb.contiguous(),
        o_proj=linear(p + "attn_output.weight"),
    )


def _expert_views(gguf: GGUFFile, i: int) -> list[TensorView]:
    return [gguf.tensor(f"blk.{i}.ffn_{w}_exps.weight") for w in ("gate", "up", "down")]


def _resident_counts(config: ModelConfig, gguf: GGUFFile, device: torch.device,
                     experts: ExpertOptions) -> dict[int, int]:
    """MoE layer -> how many routed experts it keeps in GPU memory (``experts.gpu_bytes`` shared out)."""
    if experts.gpu_bytes == 0:
        return {}
    if device.type != "cuda":
        raise InvalidRequestError(f"gpu_expert_memory={experts.gpu_bytes} needs a model on a CUDA device, not {device}")
    from ksdk.offload.gpu_experts import ExpertLayout
    from ksdk.offload.resident import resident_counts

    moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    nbytes = [ExpertLayout.from_views(*_expert_views(gguf, i)).nbytes for i in moe_layers]  # types with GPU kernels
    counts = resident_counts(experts.gpu_bytes, nbytes, config.num_experts)
    logger.info("GPU-resident routed experts: %s per MoE layer, %.2f GiB", sorted(set(counts)),
                sum(c * b for c, b in zip(counts, nbytes)) / 2**30)
    return dict(zip(moe_layers, counts))


def _ffn(config: ModelConfig, gguf: GGUFFile, i: int, linear, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
         experts: ExpertOptions, streaming: tuple[ExpertStaging, StreamCrossover] | None,
         num_resident: int = 0) -> MLP | MoE:
    p = f"blk.{i}."
    if not config.is_moe_layer(i):
        return MLP(linear(p + "ffn_gate.weight"), linear(p + "ffn_up.weight"), linear(p + "ffn_down.weight"))
    bias = p + "exp_probs_b.bias"
    router = Router(config, gguf.tensor(p + "ffn_gate_inp.weight").dequantize(torch.float32).to(device),
                    gguf.tensor(bias).dequantize(torch.float32).to(device) if gguf.has(bias) else None)
    views = _expert_views(gguf, i)
    routed = build_routed_experts(views, device, dtype, experts, streaming)
    shared = None
    if config.num_shared_experts:
        shared = MLP(linear(p + "ffn_gate_shexp.weight"), linear(p + "ffn_up_shexp.weight"),
                     linear(p + "ffn_down_shexp.weight"))
    resident = None
    if num_resident:
        from ksdk.offload.resident import ResidentExperts

        try:
            resident = ResidentExperts(*views, experts=range(num_resident), device=device)
        except torch.cuda.OutOfMemoryError as exc:
            raise InvalidRequestError(f"gpu_expert_memory={experts.gpu_bytes} bytes do not fit: the GPU ran out of "
                                      f"memory placing layer {i}'s {num_resident} routed experts; give a smaller "
                                      f"size") from exc
    return MoE(router, routed, shared, resident)
