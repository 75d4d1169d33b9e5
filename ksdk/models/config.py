"""The model's hyper-parameters, read once from GGUF metadata (no Hugging Face folder needed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from ksdk.errors import ModelFileError, UnsupportedModelError

__all__ = ["ModelConfig"]

ARCH = "deepseek2"
_GATING = {1: "softmax", 2: "sigmoid"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3/R1 hyper-parameters (DESIGN.md §5). Built by :meth:`from_gguf`."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # dense layers' MLP width
    context_length: int
    rms_norm_eps: float
    # MLA
    q_lora_rank: int  # 0: no q low-rank path (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # rotary / YaRN
    rope_theta: float
    rope_scaling_type: Literal["none", "yarn"]
    rope_scaling_factor: float
    rope_original_context_length: int
    rope_yarn_log_multiplier: float  # 0.1 * mscale_all_dim
    # MoE
    num_dense_layers: int  # leading dense layers
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    gating: Literal["softmax", "sigmoid"]
    num_groups: int
    topk_groups: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token per layer in the latent cache: [c_kv | k_pe]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times the YaRN mscale squared when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling_type == "yarn" and self.rope_scaling_factor > 1.0:
            mscale = 1.0 + self.rope_yarn_log_multiplier * math.log(self.rope_scaling_factor)
            scale *= mscale * mscale
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.num_dense_layers

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> ModelConfig:
        arch = metadata.get("general.architecture")
        if arch != ARCH:
            raise UnsupportedModelError(f"general.architecture is {arch!r}; ksdk runs {ARCH!r} (DeepSeek-V2/V3/R1)")

        def key(name: str, default: Any = ...) -> Any:
            full = f"{ARCH}.{name}"
            if full in metadata:
                return metadata[full]
            if default is ...:
                raise ModelFileError(f"GGUF metadata lacks {full!r}, which a {ARCH} model needs")
            return default

        num_heads = int(key("attention.head_count"))
        rope_dim = int(key("rope.dimension_count"))
        # Converters that store the MLA form write the per-head sizes under *_mla and the latent sizes in
        # key_length/value_length; older ones write the per-head sizes directly.
        if f"{ARCH}.attention.key_length_mla" in metadata:
            qk_head_dim = int(key("attention.key_length_mla"))
            v_head_dim = int(key("attention.value_length_mla"))
        else:
            qk_head_dim = int(key("attention.key_length"))
            v_head_dim = int(key("attention.value_length"))
        gating_id = int(key("expert_gating_func", 1))
        if gating_id not in _GATING:
            raise UnsupportedModelError(f"{ARCH}.expert_gating_func is {gating_id}; supported: 1 (softmax), 2 (sigmoid)")
        scaling_type = str(key("rope.scaling.type", "none"))
        if scaling_type not in ("none", "yarn"):
            raise UnsupportedModelError(f"{ARCH}.rope.scaling.type is {scaling_type!r}; supported: none, yarn")
        vocab = metadata.get(f"{ARCH}.vocab_size")
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelFileError(f"GGUF metadata has neither {ARCH}.vocab_size nor tokenizer.ggml.tokens")
            vocab = len(tokens)
        num_experts = int(key("expert_count", 0))
        cfg = cls(
            name=str(metadata.get("general.name", "")),
            vocab_size=int(vocab),
            hidden_size=int(key("embedding_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            intermediate_size=int(key("feed_forward_length")),
            context_length=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            q_lora_rank=int(key("attention.q_lora_rank", 0) or 0),
            kv_lora_rank=int(key("attention.kv_lora_rank")),
            qk_nope_head_dim=qk_head_dim - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=v_head_dim,
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling_type="yarn" if scaling_type == "yarn" else "none",
            rope_scaling_factor=float(key("rope.scaling.factor", 1.0)),
            rope_original_context_length=int(key("rope.scaling.original_context_length", key("context_length"))),
            rope_yarn_log_multiplier=float(key("rope.scaling.yarn_log_multiplier", 0.0)),
            num_dense_layers=int(key("leading_dense_block_count", 0)),
            num_experts=num_experts,
            num_experts_per_tok=int(key("expert_used_count", 0)),
            num_shared_experts=int(key("expert_shared_count", 0)),
            moe_intermediate_size=int(key("expert_feed_forward_length", 0)),
            routed_scaling_factor=float(key("expert_weights_scale", 1.0)),
            norm_topk_prob=bool(key("expert_weights_norm", False)),
            gating=_GATING[gating_id],  # type: ignore[arg-type]
            num_groups=int(key("expert_group_count", 1) or 1),
            topk_groups=int(key("expert_group_used_count", 1) or 1),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise UnsupportedModelError(f"inconsistent {ARCH} metadata: {what}")

        need(self.qk_nope_head_dim > 0, f"key length {self.qk_head_dim} must exceed the rope dimension")
        need(self.qk_rope_head_dim % 2 == 0, f"rope.dimension_count {self.qk_rope_head_dim} must be even")
        if self.num_experts:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"expert_used_count {self.num_experts_per_tok} must be within 1..expert_count {self.num_experts}")
            need(self.num_experts % self.num_groups == 0,
                 f"expert_count {self.num_experts} not divisible by expert_group_count {self.num_groups}")
            need(0 < self.topk_groups <= self.num_groups,
                 f"expert_group_used_count {self.topk_groups} must be within 1..{self.num_groups}")
