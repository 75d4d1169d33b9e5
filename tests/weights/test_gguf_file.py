"""ksdk.weights.gguf_file: files, split sets and folders written with gguf.GGUFWriter."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from ksdk.errors import ModelFileError, UnsupportedModelError
from ksdk.weights.gguf_file import GGUFFile, require_architecture
from ksdk.weights.quantize import quantize

Q = GGMLQuantizationType
RNG = np.random.default_rng(7)
EMBD = RNG.standard_normal((6, 32)).astype(np.float32)  # [vocab, hidden]
NORM = RNG.standard_normal(32).astype(np.float16)
EXPERTS = RNG.standard_normal((4, 3, 256)).astype(np.float32)  # [n_expert, out, in]
EXPERTS_Q4K = quantize(EXPERTS, Q.Q4_K)
DOWN = RNG.standard_normal((8, 64)).astype(np.float32)
DOWN_Q8 = quantize(DOWN, Q.Q8_0)


def _write(path: Path, split_max_tensors: int = 0) -> None:
    writer = gguf.GGUFWriter(path, "deepseek2", split_max_tensors=split_max_tensors)
    writer.add_name("Tiny-DeepSeek")
    writer.add_block_count(1)
    writer.add_uint32("deepseek2.expert_count", 4)
    writer.add_float32("deepseek2.rope.freq_base", 10000.0)
    writer.add_bool("deepseek2.expert_weights_norm", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1])
    writer.add_tensor("token_embd.weight", EMBD)
    writer.add_tensor("output_norm.weight", NORM)
    writer.add_tensor("blk.0.ffn_up_exps.weight", EXPERTS_Q4K, raw_shape=EXPERTS_Q4K.shape, raw_dtype=Q.Q4_K)
    writer.add_tensor("blk.0.ffn_down.weight", DOWN_Q8, raw_shape=DOWN_Q8.shape, raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    _write(path)
    return path


@pytest.fixture
def split_set(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "split"
    folder.mkdir()
    _write(folder / "tiny.gguf", split_max_tensors=2)  # gguf-split's naming and split.* keys
    parts = sorted(folder.iterdir())
    assert [p.name for p in parts] == ["tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]
    return parts


def _check_model(f: GGUFFile) -> None:
    assert f.architecture == "deepseek2"
    assert f.metadata["general.name"] == "Tiny-DeepSeek"
    assert f.metadata["deepseek2.expert_count"] == 4 and type(f.metadata["deepseek2.expert_count"]) is int
    assert f.metadata["deepseek2.rope.freq_base"] == 10000.0
    assert f.metadata["deepseek2.expert_weights_norm"] is True
    assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "b"]
    assert f.metadata["tokenizer.ggml.token_type"] == [3, 1, 1]
    assert not any(k.startswith(("split.", "GGUF.")) for k in f.metadata)
    assert sorted(f.tensor_names) == sorted(
        ["token_embd.weight", "output_norm.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down.weight"]
    )
    assert f.has("output_norm.weight") and not f.has("output.weight")

    embd = f.tensor("token_embd.weight")
    assert (embd.qtype, embd.shape, embd.raw.shape, embd.nbytes) == (Q.F32, (6, 32), (6, 128), 768)
    assert torch.equal(embd.dequantize(), torch.from_numpy(EMBD))
    norm = f.tensor("output_norm.weight")
    assert (norm.qtype, norm.shape) == (Q.F16, (32,))
    assert torch.equal(norm.dequantize(torch.float16), torch.from_numpy(NORM))
    down = f.tensor("blk.0.ffn_down.weight")
    assert (down.qtype, down.shape, down.raw.shape) == (Q.Q8_0, (8, 64), (8, 68))
    assert np.array_equal(down.raw, DOWN_Q8)
    experts = f.tensor("blk.0.ffn_up_exps.weight")
    assert (experts.qtype, experts.shape, experts.raw.shape) == (Q.Q4_K, (4, 3, 256), (4, 3, 144))
    assert torch.equal(experts.dequantize()[2], experts.expert(2).dequantize())


def test_single_file(model_file: Path) -> None:
    with GGUFFile.open(model_file) as f:
        assert f.parts == (model_file,)
        _check_model(f)


def test_folder_with_one_file(model_file: Path) -> None:
    with GGUFFile.open(model_file.parent) as f:
        assert f.path == model_file
        _check_model(f)


def test_split_set_from_first_part_folder_or_later_part(split_set: list[Path]) -> None:
    for given in (split_set[0], split_set[0].parent, split_set[1]):
        with GGUFFile.open(given) as f:
            assert f.parts == tuple(split_set) and f.path == split_set[0]
            _check_model(f)


def test_views_are_zero_copy_and_read_only(model_file: Path) -> None:
    with GGUFFile.open(model_file) as f:
        experts = f.tensor("blk.0.ffn_up_exps.weight")
        again = f.tensor("blk.0.ffn_up_exps.weight")
        expert = experts[1]
    assert isinstance(experts.raw, np.memmap) and Path(experts.raw.filename) == model_file
    assert np.shares_memory(experts.raw, again.raw) and np.shares_memory(experts.raw, expert.raw)
    assert not experts.raw.flags.writeable
    assert (expert.name, expert.shape) == ("blk.0.ffn_up_exps.weight[1]", (3, 256))
    assert np.array_equal(expert.raw, EXPERTS_Q4K[1])
    assert torch.equal(experts[-1].dequantize(), experts[3].dequantize())  # views outlive close()


def test_slicing_errors(model_file: Path) -> None:
    with GGUFFile.open(model_file) as f:
        experts = f.tensor("blk.0.ffn_up_exps.weight")
        with pytest.raises(IndexError, match="index 4 out of range for outer size 4"):
            experts[4]
        with pytest.raises(IndexError, match="no outer dimension"):
            f.tensor("output_norm.weight")[0]
        with pytest.raises(ModelFileError, match="an expert tensor is 3-D"):
            f.tensor("blk.0.ffn_down.weight").expert(0)


def test_missing_tensor_key_and_closed_file(model_file: Path) -> None:
    f = GGUFFile.open(model_file)
    with pytest.raises(ModelFileError, match=r"has no tensor 'output\.weight'") as info:
        f.tensor("output.weight")
    assert str(model_file) in str(info.value)
    with pytest.raises(ModelFileError, match=r"lacks metadata key 'deepseek2\.expert_group_count'"):
        f.require("deepseek2.expert_group_count")
    assert f.require("deepseek2.expert_count") == 4
    f.close()
    with pytest.raises(ModelFileError, match="is closed"):
        f.tensor("token_embd.weight")


def test_require_architecture(model_file: Path) -> None:
    with GGUFFile.open(model_file) as f:
        assert require_architecture(f, "deepseek2") == "deepseek2"
        with pytest.raises(UnsupportedModelError, match=r"holds a 'deepseek2' model; ksdk runs: 'llama'"):
            require_architecture(f, "llama")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"does not exist") as info:
        GGUFFile.open(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(info.value)


def test_not_gguf_and_empty_files(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("{'this': 'is json'}")
    with pytest.raises(ModelFileError, match=r"model\.gguf is not a GGUF file: it starts with b\"{'th\""):
        GGUFFile.open(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.gguf is not a GGUF file: an empty file"):
        GGUFFile.open(empty)


@pytest.mark.parametrize("keep", [3, 6, 20, 200], ids=lambda n: f"first{n}bytes")
def test_header_cut_short(model_file: Path, keep: int) -> None:
    model_file.write_bytes(model_file.read_bytes()[:keep])
    expected = "is not a GGUF file" if keep < 4 else r"is a truncated or corrupt GGUF file: its header"
    with pytest.raises(ModelFileError, match=rf"tiny\.gguf {expected}"):
        GGUFFile.open(model_file)


def test_garbage_after_magic(model_file: Path) -> None:
    data = bytearray(model_file.read_bytes())
    data[4:64] = RNG.integers(0, 256, 60, dtype=np.uint8).tobytes()
    model_file.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"tiny\.gguf is a truncated or corrupt GGUF file"):
        GGUFFile.open(model_file)


def test_tensor_data_cut_short(model_file: Path) -> None:
    model_file.write_bytes(model_file.read_bytes()[:-100])
    pattern = r"tiny\.gguf is truncated: tensor 'blk\.0\.ffn_down\.weight' needs bytes \d+\.\.\d+, the file has"
    with pytest.raises(ModelFileError, match=pattern):
        GGUFFile.open(model_file)


def test_big_endian_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(path, "deepseek2", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("output_norm.weight", NORM.byteswap())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"be\.gguf is a big-endian GGUF file"):
        GGUFFile.open(path)


def test_missing_split_part_is_named(split_set: list[Path]) -> None:
    split_set[1].unlink()
    with pytest.raises(ModelFileError, match=r"split GGUF part .*tiny-00002-of-00002\.gguf is missing"):
        GGUFFile.open(split_set[0])


def test_split_count_must_match_the_parts_found(split_set: list[Path], tmp_path: Path) -> None:
    alone = tmp_path / "alone-00001-of-00001.gguf"
    shutil.copy(split_set[0], alone)
    with pytest.raises(ModelFileError, match=r"split\.count = 2, but 1 part\(s\) were found"):
        GGUFFile.open(alone)


def test_folder_must_hold_exactly_one_model(model_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match=r"holds no \.gguf file"):
        GGUFFile.open(empty)
    shutil.copy(model_file, tmp_path / "other.gguf")
    with pytest.raises(ModelFileError, match=r"must hold one model .*found: other\.gguf, tiny\.gguf"):
        GGUFFile.open(tmp_path)
