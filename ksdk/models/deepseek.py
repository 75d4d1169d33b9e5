"""DeepSeek-V2/V3/R1 as a composition of ksdk.layers, built from a GGUF file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ksdk.layers.attention_metadata import AttentionMetadata
from ksdk.layers.embedding import Embedding
from ksdk.layers.linear import MLP, Linear, load_dense
from ksdk.layers.mla import MLAttention
from ksdk.layers.moe import MoE, Router, RoutedExperts, TorchExperts
from ksdk.layers.norm import RMSNorm
from ksdk.layers.rotary import RotaryEmbedding
from ksdk.errors import UnsupportedQuantError
from ksdk.models.config import ModelConfig
from ksdk.weights.quants import SUPPORTED_QTYPES

if TYPE_CHECKING:
    from ksdk.offload.cpu_experts import CPUExperts
    from ksdk.weights.gguf_file import GGUFFile

__all__ = ["DecoderLayer", "DeepseekForCausalLM"]


class DecoderLayer(torch.nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: MLAttention, ffn_norm: RMSNorm, ffn: MLP | MoE) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv_pages: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, meta, kv_pages)
        return x + self.ffn(self.ffn_norm(x))


class DeepseekForCausalLM(torch.nn.Module):
    """The whole model. ``forward`` runs one engine step over a flat batch of new tokens."""

    def __init__(self, config: ModelConfig, embed: Embedding, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: Linear, device: torch.device, kv_dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.embed = embed
        self.layers = torch.nn.ModuleList(layers)
        self.norm, self.lm_head = norm, lm_head
        self.rotary = RotaryEmbedding(config).to(device)
        self.device, self.kv_dtype = device, kv_dtype

    @property
    def kv_cache_dim(self) -> int:
        return self.config.kv_cache_dim

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """[T] ids and positions -> [B, vocab] fp32 logits at each sequence's last new token."""
        x = self.embed(input_ids)  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions)
        for layer, kv_pages in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, meta, kv_pages)
        x = self.norm(x[meta.logits_indices])
        return self.lm_head(x).float()

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  kv_dtype: torch.dtype | None = None, experts: str = "torch") -> DeepseekForCausalLM:
        """Build from an open GGUF file. ``experts``: "torch" (dequantize touched experts) or "native".

        On CUDA the non-expert weights stay in their GGUF blocks (QuantLinear) and "native" experts run on the CPU."""
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

        layers = [
            DecoderLayer(norm(f"blk.{i}.attn_norm.weight"), _attention(config, gguf, i, linear, norm, dense),
                         norm(f"blk.{i}.ffn_norm.weight"), _ffn(config, gguf, i, linear, device, dtype, experts))
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


class _HostExperts:
    """CPU-computed routed experts for a model on the GPU: tensors cross through pinned host buffers."""

    def __init__(self, experts: CPUExperts, device: torch.device) -> None:
        self.experts, self.device = experts, device
        self._buffers: dict[str, torch.Tensor] = {}

    def _pinned(self, key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A pinned buffer of ``like``'s shape, grown as batches grow."""
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.shape[0] < like.shape[0] or buf.shape[1:] != like.shape[1:]:
            buf = torch.empty(like.shape, dtype=dtype, pin_memory=True)
            self._buffers[key] = buf
        return buf[: like.shape[0]]

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32  # what the kernels read
        x_host = self._pinned("x", x, x_dtype)
        ids_host = self._pinned("ids", ids, torch.int32)
        w_host = self._pinned("weights", weights, torch.float32)
        out_host = self._pinned("out", x, torch.float32)
        x_host.copy_(x, non_blocking=True)
        ids_host.copy_(ids, non_blocking=True)
        w_host.copy_(weights, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the copies (and the last layer's upload) landed
        self.experts.submit(x_host, ids_host, w_host, out_host)
        self.experts.wait()
        return out_host.to(self.device, non_blocking=True)


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


def _ffn(config: ModelConfig, gguf: GGUFFile, i: int, linear, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
         experts: str) -> MLP | MoE:
    p = f"blk.{i}."
    if not config.is_moe_layer(i):
        return MLP(linear(p + "ffn_gate.weight"), linear(p + "ffn_up.weight"), linear(p + "ffn_down.weight"))
    bias = p + "exp_probs_b.bias"
    router = Router(config, gguf.tensor(p + "ffn_gate_inp.weight").dequantize(torch.float32).to(device),
                    gguf.tensor(bias).dequantize(torch.float32).to(device) if gguf.has(bias) else None)
    views = [gguf.tensor(p + f"ffn_{w}_exps.weight") for w in ("gate", "up", "down")]
    routed: RoutedExperts
    if experts == "native":
        from ksdk.offload.cpu_experts import CPUExperts

        routed = CPUExperts(*views)
        if device.type != "cpu":
            routed = _HostExperts(routed, device)
    else:
        routed = TorchExperts(*views, device=device, dtype=dtype)
    shared = None
    if config.num_shared_experts:
        shared = MLP(linear(p + "ffn_gate_shexp.weight"), linear(p + "ffn_up_shexp.weight"),
                     linear(p + "ffn_down_shexp.weight"))
    return MoE(router, routed, shared)
