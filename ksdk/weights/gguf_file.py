"""A GGUF model on disk (one file, a split set, or a folder holding either) with memmapped tensor views.

Built on ``gguf.GGUFReader``: metadata values are converted to plain Python on first access, and tensor
bytes are never copied: a :class:`TensorView` is a read-only numpy view into the file mapping.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, Keys
from gguf.gguf_reader import ReaderField, ReaderTensor

from ksdk.errors import ModelFileError, UnsupportedModelError
from ksdk.weights.quants import dequantize

__all__ = ["GGUFFile", "TensorView", "require_architecture", "split_paths"]

_GGUF_MAGIC = b"GGUF"
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SPLIT_PREFIX = "split."


@dataclass(frozen=True, eq=False)
class TensorView:
    """One tensor's quantized bytes, viewed in place in the file mapping.

    ``shape`` is in torch order (outermost first): a 2-D weight is (out_features, in_features) and a 3-D
    expert tensor is (n_expert, out_features, in_features). ``raw`` is uint8 [*shape[:-1], bytes_per_row].
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def n_elements(self) -> int:
        return prod(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values as a new tensor of ``shape`` (decoded in float32, then cast to ``dtype``)."""
        values = dequantize(self.raw, self.qtype, self.shape, name=self.name)
        return values if dtype == torch.float32 else values.to(dtype)

    def __getitem__(self, index: int) -> TensorView:
        """Slice ``index`` of the outermost dimension, still zero-copy (an expert of a 3-D tensor)."""
        if len(self.shape) < 2:
            raise IndexError(f"tensor {self.name!r} of shape {self.shape} has no outer dimension to index")
        outer = self.shape[0]
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"tensor {self.name!r}: index must be an int, got {type(index).__name__}")
        if not -outer <= index < outer:
            raise IndexError(f"tensor {self.name!r}: index {index} out of range for outer size {outer}")
        i = int(index) % outer
        return TensorView(f"{self.name}[{i}]", self.qtype, self.shape[1:], self.raw[i])

    def expert(self, index: int) -> TensorView:
        """Expert ``index`` of a 3-D ``*_exps`` tensor (the same as ``view[index]``)."""
        if len(self.shape) != 3:
            raise ModelFileError(f"tensor {self.name!r} has shape {self.shape}; an expert tensor is 3-D")
        return self[index]


def split_paths(path: Path) -> list[Path]:
    """All parts of the split set ``path`` belongs to (just ``[path]`` for an unsplit file).

    Raises ModelFileError naming the first missing part."""
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    stem, count = match["stem"], int(match["count"])
    parts = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for part in parts:
        if not part.is_file():
            raise ModelFileError(f"split GGUF part {part} is missing (the set of {count} parts starts at {parts[0]})")
    return parts


def _model_in_folder(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".gguf" and p.is_file())
    if not files:
        raise ModelFileError(f"folder {folder} holds no .gguf file")
    firsts = [p for p in files if (m := _SPLIT_NAME.match(p.name)) is None or int(m["index"]) == 1]
    if len(firsts) == 1 and set(split_paths(firsts[0])) == set(files):
        return firsts[0]
    names = ", ".join(p.name for p in files)
    raise ModelFileError(f"folder {folder} must hold one model (one file or one split set), found: {names}")


def _check_magic(path: Path) -> None:
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if head != _GGUF_MAGIC:
        found = "an empty file" if not head else f"it starts with {head!r}"
        raise ModelFileError(f"{path} is not a GGUF file: {found}, expected magic {_GGUF_MAGIC!r}")


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every tensor's byte range against the file size before viewing it.

    The base reader slices the memmap first, so data past the end surfaces as a numpy reshape error."""

    def __init__(self, path: Path) -> None:
        self.source_path = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        size = len(self.data)
        for f in fields:
            _, name, _, dims, raw_type, offset = f.parts
            block, nbytes_per_block = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            begin = start_offs + int(offset[0])
            end = begin + prod(int(d) for d in dims) // block * nbytes_per_block
            if end > size:
                raise ModelFileError(
                    f"{self.source_path} is truncated: tensor {bytes(name).decode(errors='replace')!r} "
                    f"needs bytes {begin}..{end}, the file has {size} bytes"
                )
        super()._build_tensors(start_offs, fields)


def _open_reader(path: Path) -> GGUFReader:
    _check_magic(path)
    try:
        reader = _CheckedReader(path)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
        # the reader slices a memmap: a header cut short surfaces as short or misshapen arrays
        size = path.stat().st_size
        raise ModelFileError(
            f"{path} is a truncated or corrupt GGUF file: its header (metadata or tensor table) "
            f"could not be read from its {size} bytes ({type(exc).__name__}: {exc})"
        ) from exc
    if reader.byte_order != "I":
        # tensor bytes would need swapping; every decoder here reads little-endian blocks
        raise UnsupportedModelError(f"{path} is a big-endian GGUF file; ksdk reads little-endian files only")
    return reader


class _Metadata(Mapping[str, Any]):
    """Key/value metadata of all parts, converted to plain Python values when first read."""

    def __init__(self, fields: dict[str, ReaderField]) -> None:
        self._fields = fields
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            self._values[key] = self._fields[key].contents()
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._fields  # without converting the value (token lists are large)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"<GGUF metadata: {len(self)} keys>"


class GGUFFile:
    """A GGUF model: merged metadata and tensors of one file or all parts of a split set.

    Use :meth:`open`; close with :meth:`close` or a ``with`` block. Views handed out stay valid after
    close (they keep their mapping alive).
    """

    def __init__(self, path: Path, parts: list[Path], readers: list[GGUFReader]) -> None:
        self.path = path
        self.parts = tuple(parts)
        self._readers = readers
        fields: dict[str, ReaderField] = {}
        self._tensors: dict[str, ReaderTensor] = {}
        for part, reader in zip(parts, readers):
            for key, f in reader.fields.items():
                # GGUF.* are the reader's header pseudo-fields; split.* is per-part bookkeeping
                if key.startswith(("GGUF.", _SPLIT_PREFIX)):
                    continue
                fields.setdefault(key, f)
            for tensor in reader.tensors:
                if tensor.name in self._tensors:
                    raise ModelFileError(f"tensor {tensor.name!r} appears twice in the split set (again in {part})")
                self._tensors[tensor.name] = tensor
        self.metadata: Mapping[str, Any] = _Metadata(fields)
        self._closed = False
        self._check_split_counts()

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Open a ``.gguf`` file, any part of a split set (``name-00001-of-00003.gguf``), or a folder
        holding one model."""
        given = Path(path)
        if not given.exists():
            raise ModelFileError(f"model path {given} does not exist")
        target = _model_in_folder(given) if given.is_dir() else given
        parts = split_paths(target)
        readers = [_open_reader(p) for p in parts]
        return cls(parts[0], parts, readers)

    def _check_split_counts(self) -> None:
        first = self._readers[0]
        count_field = first.get_field(Keys.Split.LLM_KV_SPLIT_COUNT)
        if count_field is not None and int(count_field.contents()) != len(self.parts):
            raise ModelFileError(
                f"{self.path} says {Keys.Split.LLM_KV_SPLIT_COUNT} = {count_field.contents()}, "
                f"but {len(self.parts)} part(s) were found"
            )
        tensors_field = first.get_field(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        if tensors_field is not None and int(tensors_field.contents()) != len(self._tensors):
            raise ModelFileError(
                f"{self.path} says {Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT} = {tensors_field.contents()}, "
                f"but the parts hold {len(self._tensors)} tensors"
            )

    # -- metadata --------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def require(self, key: str) -> Any:
        """The value of metadata ``key``; ModelFileError naming the key if the file lacks it."""
        if key not in self.metadata:
            raise ModelFileError(f"{self.path} lacks metadata key {key!r}")
        return self.metadata[key]

    # -- tensors ---------------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> TensorView:
        """The named tensor as a zero-copy view; ModelFileError naming it if it is absent."""
        if self._closed:
            raise ModelFileError(f"{self.path} is closed")
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ModelFileError(f"{self.path} has no tensor {name!r}")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        data = tensor.data
        # float tensors come typed from the reader; expose every type as bytes per row
        raw = data.view(np.uint8) if data.dtype != np.uint8 else data
        raw = raw.reshape(*shape[:-1], -1)
        return TensorView(name, GGMLQuantizationType(tensor.tensor_type), shape, raw)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the file mappings (views already handed out keep theirs)."""
        self._closed = True
        self._readers = []
        self._tensors = {}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._tensors)} tensors"
        return f"GGUFFile({str(self.path)!r}, parts={len(self.parts)}, {state})"


def require_architecture(gguf_file: GGUFFile, *allowed: str) -> str:
    """The file's architecture, if it is one of ``allowed``; else UnsupportedModelError naming it."""
    arch = gguf_file.architecture
    if arch not in allowed:
        raise UnsupportedModelError(
            f"{gguf_file.path} holds a {arch!r} model; ksdk runs: {', '.join(repr(a) for a in allowed)}"
        )
    return arch
