"""A transformers model holding a GGUF file's weights, dequantized by the gguf package: the numerical
reference for ksdk's own path. Needs the ``test`` extra (transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

__all__ = ["hf_model_from_gguf", "read_dequantized"]


def read_dequantized(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, fp32 tensors in torch order), each tensor's raw blocks dequantized by the gguf package.

    The header is read by ksdk's own reader (checked against gguf.GGUFReader in tests/weights, and ~30x
    faster on a 129k-token vocabulary); the numbers come from gguf.quants alone.
    """
    from ksdk.weights.gguf_file import GGUFFile

    with GGUFFile.open(path) as f:
        metadata = dict(f.metadata)
        tensors = {}
        for name in f.tensor_names:
            view = f.tensor(name)
            tensors[name] = gguf.quants.dequantize(np.asarray(view.raw), view.qtype).reshape(view.shape)
    return metadata, {k: v.astype(np.float32) for k, v in tensors.items()}


def _hf_config(md: dict[str, Any]):  # noqa: ANN202
    import transformers

    a = "deepseek2."
    rope_dim = md[a + "rope.dimension_count"]
    mscale_all_dim = md.get(a + "rope.scaling.yarn_log_multiplier", 0.0) / 0.1
    common = dict(
        vocab_size=md[a + "vocab_size"],
        hidden_size=md[a + "embedding_length"],
        intermediate_size=md[a + "feed_forward_length"],
        moe_intermediate_size=md[a + "expert_feed_forward_length"],
        num_hidden_layers=md[a + "block_count"],
        num_attention_heads=md[a + "attention.head_count"],
        num_key_value_heads=md[a + "attention.head_count"],
        n_shared_experts=md[a + "expert_shared_count"],
        n_routed_experts=md[a + "expert_count"],
        num_experts_per_tok=md[a + "expert_used_count"],
        routed_scaling_factor=md[a + "expert_weights_scale"],
        first_k_dense_replace=md[a + "leading_dense_block_count"],
        norm_topk_prob=md[a + "expert_weights_norm"],
        q_lora_rank=md.get(a + "attention.q_lora_rank") or None,
        kv_lora_rank=md[a + "attention.kv_lora_rank"],
        qk_nope_head_dim=md[a + "attention.key_length_mla"] - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=md[a + "attention.value_length_mla"],
        max_position_embeddings=md[a + "context_length"],
        rms_norm_eps=md[a + "attention.layer_norm_rms_epsilon"],
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": md[a + "rope.freq_base"],
            "factor": md[a + "rope.scaling.factor"],
            "original_max_position_embeddings": md[a + "rope.scaling.original_context_length"],
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        },
        attention_bias=False,
        tie_word_embeddings=False,
    )
    if md[a + "expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID):
        return transformers.DeepseekV3Config(
            n_group=md[a + "expert_group_count"], topk_group=md[a + "expert_group_used_count"], **common)
    return transformers.DeepseekV2Config(topk_method="greedy", **common)


def _hf_state_dict(md: dict[str, Any], t: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    a = "deepseek2."
    heads, rank = md[a + "attention.head_count"], md[a + "attention.kv_lora_rank"]
    nope = md[a + "attention.key_length_mla"] - md[a + "rope.dimension_count"]
    v = md[a + "attention.value_length_mla"]
    sd: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": t["token_embd.weight"],
        "model.norm.weight": t["output_norm.weight"],
        "lm_head.weight": t["output.weight"],
    }
    attn = {"attn_q_a": "q_a_proj", "attn_q_a_norm": "q_a_layernorm", "attn_q_b": "q_b_proj", "attn_q": "q_proj",
            "attn_kv_a_mqa": "kv_a_proj_with_mqa", "attn_kv_a_norm": "kv_a_layernorm", "attn_kv_b": "kv_b_proj",
            "attn_output": "o_proj"}
    mlp = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
    for i in range(md[a + "block_count"]):
        p, hp = f"blk.{i}.", f"model.layers.{i}."
        sd[hp + "input_layernorm.weight"] = t[p + "attn_norm.weight"]
        sd[hp + "post_attention_layernorm.weight"] = t[p + "ffn_norm.weight"]
        if p + "attn_k_b.weight" in t:
            k_b = t[p + "attn_k_b.weight"].transpose(0, 2, 1)  # [H, nope, rank]
            v_b = t[p + "attn_v_b.weight"]  # [H, v, rank]
            t = {**t, p + "attn_kv_b.weight": np.concatenate([k_b, v_b], axis=1).reshape(heads * (nope + v), rank)}
        for g, h in attn.items():
            if p + g + ".weight" in t:
                sd[hp + "self_attn." + h + ".weight"] = t[p + g + ".weight"]
        if p + "ffn_gate_inp.weight" not in t:
            for g, h in mlp.items():
                sd[hp + "mlp." + h + ".weight"] = t[p + g + ".weight"]
            continue
        sd[hp + "mlp.gate.weight"] = t[p + "ffn_gate_inp.weight"]
        if p + "exp_probs_b.bias" in t:
            sd[hp + "mlp.gate.e_score_correction_bias"] = t[p + "exp_probs_b.bias"]
        sd[hp + "mlp.experts.gate_up_proj"] = np.concatenate(
            [t[p + "ffn_gate_exps.weight"], t[p + "ffn_up_exps.weight"]], axis=1)
        sd[hp + "mlp.experts.down_proj"] = t[p + "ffn_down_exps.weight"]
        for g, h in mlp.items():
            if p + g + "_shexp.weight" in t:
                sd[hp + "mlp.shared_experts." + h + ".weight"] = t[p + g + "_shexp.weight"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def hf_model_from_gguf(path: Path):  # noqa: ANN201
    """A transformers DeepseekV3ForCausalLM (sigmoid routing) or DeepseekV2ForCausalLM (softmax) in fp32."""
    import transformers

    md, tensors = read_dequantized(path)
    config = _hf_config(md)
    config._attn_implementation = "eager"
    cls = (transformers.DeepseekV3ForCausalLM if isinstance(config, transformers.DeepseekV3Config)
           else transformers.DeepseekV2ForCausalLM)
    model = cls(config)
    model.load_state_dict(_hf_state_dict(md, tensors), strict=True)
    return model.float().eval()
