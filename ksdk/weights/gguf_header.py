"""The header of one GGUF file: version, key/value metadata, tensor infos and where tensor data starts.

Layout (little-endian): magic ``GGUF`` · u32 version (2 or 3) · u64 tensor count · u64 kv count ·
kv pairs (string key, u32 value type, value) · tensor infos (string name, u32 n_dims, u64 dims[n_dims]
innermost first, u32 ggml type, u64 offset from data start) · padding to ``general.alignment`` (32) · data.
A string is a u64 byte length then UTF-8 bytes; an array is a u32 item type, a u64 length, then the items.

The header is walked once over a memoryview of the file mapping with ``struct`` reads; arrays of
fixed-size scalars are decoded with one ``np.frombuffer`` each. Values come out as plain Python values,
equal to ``gguf.GGUFReader``'s ``ReaderField.contents()`` except that nested arrays stay nested (the
reader flattens them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ksdk.errors import ModelFileError, UnsupportedModelError

__all__ = ["GGUF_MAGIC", "GGUFHeader", "TensorInfo", "read_header"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_VERSIONS = (2, 3)
_ALIGNMENT_KEY = "general.alignment"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
# numpy's bool reads any nonzero byte as True, as struct's "?" does
_SCALAR_DTYPES: dict[GGUFValueType, np.dtype[Any]] = {
    t: np.dtype(np.bool_ if t == GGUFValueType.BOOL else s.format) for t, s in _SCALARS.items()
}
# the fewest bytes a kv pair / a tensor info can take: bounds counts read from a corrupt header
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
# real files nest two deep at most; the bound keeps a corrupt header from exhausting the stack
_MAX_ARRAY_DEPTH = 16


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-info entry: ``dims`` in GGUF order (innermost first), ``offset`` from the data start."""

    name: str
    dims: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch order, outermost first: (out_features, in_features) for a 2-D weight."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file before its tensor data; ``data_offset`` is where that data starts."""

    version: int
    metadata: MappingProxyType[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int


class _HeaderReader:
    """A cursor over the file's bytes that raises ModelFileError naming the file and what was being read."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.off = 0
        self.what = "the header counts"  # updated as the walk proceeds, for error messages

    def corrupt(self, detail: str) -> ModelFileError:
        return ModelFileError(f"{self.path} is a truncated or corrupt GGUF file: {detail}")

    def cut_short(self) -> ModelFileError:
        return self.corrupt(f"its header ends at byte {self.size} while reading {self.what}")

    def need(self, nbytes: int) -> None:
        if self.off + nbytes > self.size:
            raise self.cut_short()

    def u32(self) -> int:
        self.need(4)
        (value,) = _U32.unpack_from(self.buf, self.off)
        self.off += 4
        return int(value)

    def u64(self) -> int:
        self.need(8)
        (value,) = _U64.unpack_from(self.buf, self.off)
        self.off += 8
        return int(value)

    def string(self) -> str:
        length = self.u64()
        self.need(length)
        start = self.off
        self.off += length
        try:
            return str(self.buf[start : self.off], "utf-8")
        except UnicodeDecodeError as exc:
            detail = f"a string in {self.what} is not UTF-8 ({exc.reason} at byte {start + exc.start})"
            raise self.corrupt(detail) from exc

    def value_type(self, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.corrupt(f"{self.what} has value type {raw}, which is not a GGUF value type") from None

    def value(self, vtype: GGUFValueType) -> Any:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self.need(scalar.size)
            (item,) = scalar.unpack_from(self.buf, self.off)
            self.off += scalar.size
            return item
        if vtype == GGUFValueType.STRING:
            return self.string()
        return self.array()

    def array(self, depth: int = 1) -> list[Any]:
        if depth > _MAX_ARRAY_DEPTH:
            raise self.corrupt(f"{self.what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        item_type = self.value_type(self.u32())
        count = self.u64()
        dtype = _SCALAR_DTYPES.get(item_type)
        if dtype is not None:
            self.need(count * dtype.itemsize)
            items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.off)
            self.off += count * dtype.itemsize
            return items.tolist()
        self.need(count * 8)  # a string or a nested array takes at least 8 bytes
        if item_type == GGUFValueType.STRING:
            return self.strings(count)
        return [self.array(depth + 1) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        # the hot loop of a 129k-token vocabulary: locals only, no method calls but the decode
        buf, off, size, unpack = self.buf, self.off, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                if off + 8 > size:
                    raise self.cut_short()
                (length,) = unpack(buf, off)
                off += 8
                stop = off + length
                if stop > size:
                    raise self.cut_short()
                append(str(buf[off:stop], "utf-8"))
                off = stop
        except UnicodeDecodeError as exc:
            raise self.corrupt(f"string {len(out)} of {self.what} is not UTF-8 ({exc.reason})") from exc
        self.off = off
        return out


def _read_metadata(reader: _HeaderReader, kv_count: int) -> dict[str, Any]:
    if kv_count * _MIN_KV_BYTES > reader.size - reader.off:
        raise reader.corrupt(f"its header claims {kv_count} metadata keys, more than its {reader.size} bytes can hold")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        reader.what = f"metadata key {index} of {kv_count}"
        key = reader.string()
        reader.what = f"the value of metadata key {key!r}"
        if key in metadata:
            raise reader.corrupt(f"metadata key {key!r} appears twice")
        vtype = reader.value_type(reader.u32())
        if key == _ALIGNMENT_KEY and vtype != GGUFValueType.UINT32:
            raise reader.corrupt(f"{_ALIGNMENT_KEY} has value type {vtype.name}; it must be UINT32")
        metadata[key] = reader.value(vtype)
    return metadata


def _read_tensor_infos(reader: _HeaderReader, tensor_count: int) -> list[TensorInfo]:
    if tensor_count * _MIN_TENSOR_INFO_BYTES > reader.size - reader.off:
        raise reader.corrupt(f"its header claims {tensor_count} tensors, more than {reader.size} bytes can describe")
    infos: list[TensorInfo] = []
    names: set[str] = set()
    for index in range(tensor_count):
        reader.what = f"tensor info {index} of {tensor_count}"
        name = reader.string()
        reader.what = f"the info of tensor {name!r}"
        if name in names:
            raise reader.corrupt(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = reader.u32()
        reader.need(n_dims * 8)
        dims = tuple(int(d) for d in np.frombuffer(reader.buf, dtype="<u8", count=n_dims, offset=reader.off))
        reader.off += n_dims * 8
        raw_type = reader.u32()
        offset = reader.u64()
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedModelError(
                f"{reader.path}: tensor {name!r} has ggml type {raw_type}, which this gguf package does not know"
            ) from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise reader.corrupt(
                f"tensor {name!r} has rows of {dims[0]} values, not a multiple of {qtype.name}'s block of {block}"
            )
        infos.append(TensorInfo(name, dims, qtype, offset, prod(dims) // block * block_bytes))
    return infos


def read_header(path: Path, file_bytes: np.ndarray) -> GGUFHeader:
    """Parse the header of ``path`` from ``file_bytes``, the uint8 mapping of the whole file.

    Raises ModelFileError for a file that is not GGUF, is cut short, or is corrupt (each message names
    the file and what was being read), UnsupportedModelError for a big-endian file or an unknown type."""
    reader = _HeaderReader(path, memoryview(file_bytes))
    reader.need(4)
    magic = bytes(reader.buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file: it starts with {magic!r}, expected magic {GGUF_MAGIC!r}")
    reader.off = 4
    reader.what = "the version"
    version = reader.u32()
    if version & 0xFFFF == 0 and version != 0:
        # a small version number read with the wrong byte order lands in the high half
        raise UnsupportedModelError(f"{path} is a big-endian GGUF file; ksdk reads little-endian files only")
    if version not in _VERSIONS:
        raise reader.corrupt(f"it says version {version}; ksdk reads GGUF versions {' and '.join(map(str, _VERSIONS))}")
    reader.what = "the tensor and key counts"
    tensor_count = reader.u64()
    kv_count = reader.u64()
    metadata = _read_metadata(reader, kv_count)
    infos = _read_tensor_infos(reader, tensor_count)

    alignment = metadata.get(_ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise reader.corrupt(f"{_ALIGNMENT_KEY} = {alignment}; it must be a power of two")
    data_offset = -(-reader.off // alignment) * alignment
    for info in infos:
        if info.offset % alignment:
            # llama.cpp refuses such files too; views of misaligned data would be slow to read
            where = f"starts at data offset {info.offset}, not a multiple of {alignment}"
            raise reader.corrupt(f"tensor {info.name!r} {where}")
        begin = data_offset + info.offset
        end = begin + info.nbytes
        if end > reader.size:
            raise ModelFileError(
                f"{path} is truncated: tensor {info.name!r} needs bytes {begin}..{end}, "
                f"the file has {reader.size} bytes"
            )
    return GGUFHeader(version, MappingProxyType(metadata), tuple(infos), alignment, data_offset)
