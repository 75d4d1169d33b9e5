"""Model files ksdk must refuse with a clear ksdk error, never a deep traceback."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from ksdk.errors import ModelFileError, UnsupportedModelError, UnsupportedQuantError
from ksdk.models import ModelConfig, load_model
from ksdk.testing.tiny_models import TinyModelSpec, random_weights, write_gguf
from ksdk.weights.gguf_file import GGUFFile

SMALL = TinyModelSpec(num_layers=2, vocab_size=512)


def _write(path: Path, weights: dict[str, np.ndarray], spec: TinyModelSpec = SMALL) -> Path:
    write_gguf(path, spec, weights, "F32", with_tokenizer=False)
    return path


def test_wrong_architecture_names_it(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        load_model(GGUFFile.open(path))


def test_unsupported_quant_type_is_refused_at_load(tmp_path: Path) -> None:
    weights = random_weights(SMALL)
    path = _write(tmp_path / "iq.gguf", {k: v for k, v in weights.items() if k != "blk.1.ffn_up_exps.weight"})
    # Re-write with one expert tensor as IQ4_NL (valid bytes, a type ksdk has no kernel for).
    writer = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "deepseek2")
    reader = gguf.GGUFReader(str(path))
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for name, value in weights.items():
        if name == "blk.1.ffn_up_exps.weight":
            E, rows, cols = value.shape
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
            raw = np.zeros((E, rows, cols // block * size), np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedQuantError, match=r"blk\.1\.ffn_up_exps\.weight.*IQ4_NL"):
        load_model(GGUFFile.open(tmp_path / "iq2.gguf"))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    weights = random_weights(SMALL)
    del weights["blk.0.attn_kv_a_mqa.weight"]
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_kv_a_mqa\.weight"):
        load_model(GGUFFile.open(_write(tmp_path / "missing.gguf", weights)))


def test_missing_metadata_key_is_named() -> None:
    with pytest.raises(ModelFileError, match="deepseek2.attention.kv_lora_rank"):
        ModelConfig.from_gguf({"general.architecture": "deepseek2", "deepseek2.attention.head_count": 4,
                               "deepseek2.rope.dimension_count": 16, "deepseek2.attention.key_length": 48,
                               "deepseek2.attention.value_length": 64, "deepseek2.vocab_size": 10,
                               "deepseek2.embedding_length": 64, "deepseek2.block_count": 1,
                               "deepseek2.feed_forward_length": 128, "deepseek2.context_length": 64})


def test_config_matches_deepseek_r1_shape() -> None:
    """The metadata llama.cpp writes for R1 gives R1's real hyper-parameters."""
    md = {"general.architecture": "deepseek2", "general.name": "DeepSeek R1", "deepseek2.vocab_size": 129280,
          "deepseek2.context_length": 163840, "deepseek2.embedding_length": 7168, "deepseek2.block_count": 61,
          "deepseek2.feed_forward_length": 18432, "deepseek2.attention.head_count": 128,
          "deepseek2.attention.q_lora_rank": 1536, "deepseek2.attention.kv_lora_rank": 512,
          "deepseek2.attention.key_length": 576, "deepseek2.attention.value_length": 512,
          "deepseek2.attention.key_length_mla": 192, "deepseek2.attention.value_length_mla": 128,
          "deepseek2.rope.dimension_count": 64, "deepseek2.rope.freq_base": 10000.0,
          "deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 40.0,
          "deepseek2.rope.scaling.original_context_length": 4096, "deepseek2.rope.scaling.yarn_log_multiplier": 0.1,
          "deepseek2.leading_dense_block_count": 3, "deepseek2.expert_count": 256, "deepseek2.expert_used_count": 8,
          "deepseek2.expert_shared_count": 1, "deepseek2.expert_feed_forward_length": 2048,
          "deepseek2.expert_weights_scale": 2.5, "deepseek2.expert_weights_norm": True,
          "deepseek2.expert_gating_func": 2, "deepseek2.expert_group_count": 8, "deepseek2.expert_group_used_count": 4}
    cfg = ModelConfig.from_gguf(md)
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_cache_dim) == (128, 64, 128, 576)
    assert cfg.gating == "sigmoid" and cfg.num_groups == 8 and cfg.topk_groups == 4
    assert sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) == 58
    mscale = 0.1 * 1.0 * np.log(40.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * mscale**2)
