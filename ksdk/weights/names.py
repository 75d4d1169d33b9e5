"""Tensor names of the GGUF ``deepseek2`` architecture (DeepSeek V2/V3/R1), kept as data.

The names match llama.cpp's converter (``gguf.constants.TENSOR_NAMES``); a test checks them there.
Which optional tensors a layer has depends on the model: no ``attn_q_a``/``attn_q_b`` without a q
low-rank (V2-Lite has ``attn_q``), either ``attn_kv_b`` or the split ``attn_k_b`` + ``attn_v_b``,
and dense ``ffn_*`` in the leading dense layers versus router + experts in MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ARCHITECTURE", "OUTPUT", "OUTPUT_NORM", "TOKEN_EMBD", "LayerTensorNames", "layer_tensor_names"]

ARCHITECTURE = "deepseek2"

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"


@dataclass(frozen=True)
class LayerTensorNames:
    """The full tensor names of one transformer layer ``blk.{layer}``."""

    layer: int
    attn_norm: str
    attn_q_a: str  # q low-rank down-projection (absent when q_lora_rank is 0)
    attn_q_a_norm: str
    attn_q_b: str
    attn_q: str  # the plain q projection used instead of q_a/q_b (V2-Lite)
    attn_kv_a_mqa: str  # x -> [c_kv | k_pe]
    attn_kv_a_norm: str
    attn_kv_b: str  # c_kv -> [k_nope | v] per head, or, in newer files, the split pair below
    attn_k_b: str
    attn_v_b: str
    attn_output: str
    ffn_norm: str
    ffn_gate: str  # dense MLP (leading dense layers)
    ffn_up: str
    ffn_down: str
    ffn_gate_inp: str  # router weight [n_expert, hidden]
    exp_probs_b: str  # router score correction bias (V3/R1)
    ffn_gate_exps: str  # routed experts, 3-D [n_expert, out, in]
    ffn_up_exps: str
    ffn_down_exps: str
    ffn_gate_shexp: str  # shared experts
    ffn_up_shexp: str
    ffn_down_shexp: str

    def all(self) -> dict[str, str]:
        """Field name -> tensor name for every tensor a layer may have."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layer"}


_BIAS_TENSORS = frozenset({"exp_probs_b"})


def layer_tensor_names(layer: int) -> LayerTensorNames:
    """The tensor names of layer ``layer`` (``blk.{layer}.<part>.weight``, ``exp_probs_b.bias``)."""
    if layer < 0:
        raise ValueError(f"layer index must be >= 0, got {layer}")
    parts = [f.name for f in fields(LayerTensorNames) if f.name != "layer"]
    names = {p: f"blk.{layer}.{p}.{'bias' if p in _BIAS_TENSORS else 'weight'}" for p in parts}
    return LayerTensorNames(layer=layer, **names)
