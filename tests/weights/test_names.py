"""ksdk.weights.names: the deepseek2 tensor names, checked against gguf-py's own tables."""

from __future__ import annotations

import pytest
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from ksdk.weights import names

# our field -> gguf-py's tensor kind
GGUF_KIND = {
    "attn_norm": MODEL_TENSOR.ATTN_NORM,
    "attn_q_a": MODEL_TENSOR.ATTN_Q_A,
    "attn_q_a_norm": MODEL_TENSOR.ATTN_Q_A_NORM,
    "attn_q_b": MODEL_TENSOR.ATTN_Q_B,
    "attn_q": MODEL_TENSOR.ATTN_Q,
    "attn_kv_a_mqa": MODEL_TENSOR.ATTN_KV_A_MQA,
    "attn_kv_a_norm": MODEL_TENSOR.ATTN_KV_A_NORM,
    "attn_kv_b": MODEL_TENSOR.ATTN_KV_B,
    "attn_k_b": MODEL_TENSOR.ATTN_K_B,
    "attn_v_b": MODEL_TENSOR.ATTN_V_B,
    "attn_output": MODEL_TENSOR.ATTN_OUT,
    "ffn_norm": MODEL_TENSOR.FFN_NORM,
    "ffn_gate": MODEL_TENSOR.FFN_GATE,
    "ffn_up": MODEL_TENSOR.FFN_UP,
    "ffn_down": MODEL_TENSOR.FFN_DOWN,
    "ffn_gate_inp": MODEL_TENSOR.FFN_GATE_INP,
    "exp_probs_b": MODEL_TENSOR.FFN_EXP_PROBS_B,
    "ffn_gate_exps": MODEL_TENSOR.FFN_GATE_EXP,
    "ffn_up_exps": MODEL_TENSOR.FFN_UP_EXP,
    "ffn_down_exps": MODEL_TENSOR.FFN_DOWN_EXP,
    "ffn_gate_shexp": MODEL_TENSOR.FFN_GATE_SHEXP,
    "ffn_up_shexp": MODEL_TENSOR.FFN_UP_SHEXP,
    "ffn_down_shexp": MODEL_TENSOR.FFN_DOWN_SHEXP,
}


def test_architecture_name() -> None:
    assert names.ARCHITECTURE == MODEL_ARCH_NAMES[MODEL_ARCH.DEEPSEEK2]


def test_global_names_match_gguf() -> None:
    deepseek2 = MODEL_TENSORS[MODEL_ARCH.DEEPSEEK2]
    for ours, kind in [
        (names.TOKEN_EMBD, MODEL_TENSOR.TOKEN_EMBD),
        (names.OUTPUT_NORM, MODEL_TENSOR.OUTPUT_NORM),
        (names.OUTPUT, MODEL_TENSOR.OUTPUT),
    ]:
        assert kind in deepseek2
        assert ours == f"{TENSOR_NAMES[kind]}.weight"


@pytest.mark.parametrize("layer", [0, 3, 60])
def test_layer_names_match_gguf(layer: int) -> None:
    deepseek2 = MODEL_TENSORS[MODEL_ARCH.DEEPSEEK2]
    ours = names.layer_tensor_names(layer)
    assert ours.layer == layer
    assert set(ours.all()) == set(GGUF_KIND)  # every field is checked below
    for field, kind in GGUF_KIND.items():
        assert kind in deepseek2, field
        suffix = "bias" if kind == MODEL_TENSOR.FFN_EXP_PROBS_B else "weight"
        assert getattr(ours, field) == f"{TENSOR_NAMES[kind].format(bid=layer)}.{suffix}"


def test_negative_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match="layer index must be >= 0, got -1"):
        names.layer_tensor_names(-1)
