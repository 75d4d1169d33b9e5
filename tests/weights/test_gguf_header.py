"""ksdk.weights.gguf_header: our header parser against gguf.GGUFReader, and its errors on hand-made headers."""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType

from ksdk.errors import ModelFileError, UnsupportedModelError
from ksdk.testing import tiny_gguf
from ksdk.weights.gguf_file import GGUFFile
from ksdk.weights.gguf_header import GGUFHeader, read_header
from ksdk.weights.quantize import quantize

Q = GGMLQuantizationType
V = GGUFValueType
RNG = np.random.default_rng(11)

SCALARS: dict[str, tuple[V, Any]] = {
    "t.uint8": (V.UINT8, 250),
    "t.int8": (V.INT8, -120),
    "t.uint16": (V.UINT16, 65000),
    "t.int16": (V.INT16, -32000),
    "t.uint32": (V.UINT32, 4_000_000_000),
    "t.int32": (V.INT32, -2_000_000_000),
    "t.float32": (V.FLOAT32, 0.1),  # not exact in float32: both readers must round the same way
    "t.bool_true": (V.BOOL, True),
    "t.bool_false": (V.BOOL, False),
    "t.string": (V.STRING, "ünïcødé ✓ <｜begin▁of▁sentence｜>"),
    "t.empty_string": (V.STRING, ""),
    "t.uint64": (V.UINT64, 2**64 - 1),
    "t.int64": (V.INT64, -(2**63)),
    "t.float64": (V.FLOAT64, 1e-300),
}
ARRAYS: dict[str, tuple[V, list[Any]]] = {
    "a.uint8": (V.UINT8, [0, 1, 255]),
    "a.int8": (V.INT8, [-128, 0, 127]),
    "a.uint16": (V.UINT16, [0, 65535]),
    "a.int16": (V.INT16, [-32768, 32767]),
    "a.uint32": (V.UINT32, [3, 1, 2**32 - 1]),
    "a.int32": (V.INT32, [-5, 7]),
    "a.float32": (V.FLOAT32, [0.1, -2.5, 3e38]),
    "a.bool": (V.BOOL, [True, False, True]),
    "a.string": (V.STRING, ["<s>", "", "Ġthe", "日本語", "a\nb"]),
    "a.uint64": (V.UINT64, [2**64 - 1, 0]),
    "a.int64": (V.INT64, [-(2**63), 2**63 - 1]),
    "a.float64": (V.FLOAT64, [1e-300, -0.0]),
}
NESTED: dict[str, list[Any]] = {
    "n.ints": [[1, 2, 3], [4], [5, 6]],
    "n.strings": [["a", "bc"], ["déf"]],
}


def _write_every_type(path: Path) -> None:
    writer = gguf.GGUFWriter(path, "deepseek2")
    writer.add_custom_alignment(64)  # sets data_alignment and the general.alignment key
    for key, (vtype, value) in SCALARS.items():
        writer.add_key_value(key, value, vtype)
    for key, (vtype, items) in ARRAYS.items():
        writer.add_key_value(key, items, V.ARRAY, sub_type=vtype)
    for key, nested in NESTED.items():
        writer.add_array(key, nested)
    writer.add_tensor("f32.weight", RNG.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16.weight", RNG.standard_normal(7).astype(np.float16))
    q8 = quantize(RNG.standard_normal((2, 4, 64)).astype(np.float32), Q.Q8_0)
    writer.add_tensor("q8.weight", q8, raw_shape=q8.shape, raw_dtype=Q.Q8_0)
    q4k = quantize(RNG.standard_normal((2, 256)).astype(np.float32), Q.Q4_K)
    writer.add_tensor("q4k.weight", q4k, raw_shape=q4k.shape, raw_dtype=Q.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read(path: Path) -> GGUFHeader:
    return read_header(path, np.memmap(path, dtype=np.uint8, mode="r"))


def _flatten(value: Any) -> Any:
    """GGUFReader flattens nested arrays; ours keeps them nested."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [leaf for item in value for leaf in _flatten(item)]
    return value


def _assert_same_as_gguf_reader(path: Path, header: GGUFHeader) -> None:
    reader = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(expected)  # same keys, in file order
    for key, value in expected.items():
        ours = _flatten(header.metadata[key])
        assert ours == value, key
        assert [type(v) for v in (ours if isinstance(ours, list) else [ours])] == [
            type(v) for v in (value if isinstance(value, list) else [value])
        ], key
    assert (header.version, header.alignment, header.data_offset) == (
        reader.fields["GGUF.version"].contents(),
        reader.alignment,
        reader.data_offset,
    )
    assert len(header.tensors) == len(reader.tensors)
    for info, tensor in zip(header.tensors, reader.tensors):
        assert (info.name, info.dims, info.qtype, info.nbytes) == (
            tensor.name,
            tuple(tensor.shape.tolist()),
            tensor.tensor_type,
            tensor.n_bytes,
        )
        assert header.data_offset + info.offset == tensor.data_offset


def test_every_value_type_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    _write_every_type(path)
    header = _read(path)
    _assert_same_as_gguf_reader(path, header)
    assert header.alignment == 64 and header.data_offset % 64 == 0
    for key, (_, value) in SCALARS.items():
        if key != "t.float32":
            assert header.metadata[key] == value and type(header.metadata[key]) is type(value), key
    assert header.metadata["t.float32"] == float(np.float32(0.1))
    assert header.metadata["a.string"] == ARRAYS["a.string"][1]
    assert header.metadata["n.ints"] == NESTED["n.ints"] and header.metadata["n.strings"] == NESTED["n.strings"]
    assert {t.name: t.shape for t in header.tensors} == {
        "f32.weight": (3, 5),
        "f16.weight": (7,),
        "q8.weight": (2, 4, 64),
        "q4k.weight": (2, 256),
    }


def test_tiny_model_matches_gguf_reader_and_opens_fast() -> None:
    path = tiny_gguf("v3", "F32")
    start = time.perf_counter()
    with GGUFFile.open(path) as f:
        seconds = time.perf_counter() - start
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 129_280
    assert seconds < 3.0, f"opening took {seconds:.2f} s (GGUFReader needs about 8 s; ours about 0.3 s)"
    _assert_same_as_gguf_reader(path, _read(path))  # GGUFReader parses 129k tokens and merges: about 8 s


# -- hand-made headers: every error names the file and what was wrong ------------------------------------


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + payload


def _tensor_info(name: str, dims: tuple[int, ...], qtype: int, offset: int) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def _file(
    tmp_path: Path, kvs: Sequence[bytes], infos: Sequence[bytes] = (), version: int = 3, data: bytes = b""
) -> Path:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    path = tmp_path / "hand.gguf"
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


NAME = _kv("general.name", V.STRING, _string("x"))
ALIGN = "general.alignment"


def test_minimal_hand_made_file(tmp_path: Path) -> None:
    path = _file(tmp_path, [NAME], [_tensor_info("w", (4,), Q.F32, 0)], version=2, data=bytes(16))
    header = _read(path)
    assert header.version == 2 and dict(header.metadata) == {"general.name": "x"}
    assert header.data_offset % 32 == 0 and header.tensors[0].nbytes == 16


@pytest.mark.parametrize(
    ("kvs", "infos", "version", "pattern"),
    [
        ([NAME], [], 4, r"it says version 4; ksdk reads GGUF versions 2 and 3"),
        (
            [_kv("deep", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 20)],
            [],
            3,
            r"the value of metadata key 'deep' nests arrays more than 16 deep",
        ),
        ([_kv("k", 13, b"")], [], 3, r"the value of metadata key 'k' has value type 13, which is not a GGUF"),
        ([NAME, NAME], [], 3, r"metadata key 'general\.name' appears twice"),
        ([_kv(b"\xff\xfe", V.UINT8, b"\0")], [], 3, r"a string in metadata key 0 of 1 is not UTF-8"),
        (
            [_kv("tokens", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _string("ok") + _string(b"\xc3"))],
            [],
            3,
            r"string 1 of the value of metadata key 'tokens' is not UTF-8",
        ),
        (
            [_kv("big", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**40))],
            [],
            3,
            r"its header ends at byte \d+ while reading the value of metadata key 'big'",
        ),
        ([_kv(ALIGN, V.UINT64, struct.pack("<Q", 32))], [], 3, r"general\.alignment has value type UINT64"),
        ([_kv(ALIGN, V.UINT32, struct.pack("<I", 48))], [], 3, r"general\.alignment = 48; it must be a power"),
        ([], [_tensor_info("w", (4,), Q.F32, 8)], 3, r"tensor 'w' starts at data offset 8, not a multiple of 32"),
        ([], [_tensor_info("w", (4,), Q.Q8_0, 0)], 3, r"tensor 'w' has rows of 4 values, not a multiple of Q8_0's"),
        ([], [_tensor_info("w", (4,), Q.F32, 0)] * 2, 3, r"tensor 'w' appears twice"),
    ],
    ids=[
        "version",
        "deep-nesting",
        "value-type",
        "duplicate-key",
        "key-utf8",
        "string-array-utf8",
        "huge-array",
        "alignment-type",
        "alignment-value",
        "misaligned-tensor",
        "partial-block",
        "duplicate-tensor",
    ],
)
def test_corrupt_headers(tmp_path: Path, kvs: list[bytes], infos: list[bytes], version: int, pattern: str) -> None:
    path = _file(tmp_path, kvs, infos, version=version, data=bytes(64))
    with pytest.raises(ModelFileError, match=rf"hand\.gguf is a truncated or corrupt GGUF file: {pattern}"):
        _read(path)


def test_counts_larger_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hand.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62) + bytes(40))
    with pytest.raises(ModelFileError, match=r"its header claims 4611686018427387904 metadata keys"):
        _read(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0) + bytes(40))
    with pytest.raises(ModelFileError, match=r"its header claims 4611686018427387904 tensors"):
        _read(path)


def test_unknown_tensor_type_and_big_endian(tmp_path: Path) -> None:
    path = _file(tmp_path, [], [_tensor_info("w", (4,), 999, 0)], data=bytes(64))
    with pytest.raises(UnsupportedModelError, match=r"tensor 'w' has ggml type 999"):
        _read(path)
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(UnsupportedModelError, match=r"hand\.gguf is a big-endian GGUF file"):
        _read(path)
