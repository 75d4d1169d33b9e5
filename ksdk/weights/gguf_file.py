"""A GGUF model on disk (one file, a split set, or a folder holding either) with memmapped tensor views.

Each part is mapped once, read-only; its header is parsed by :mod:`ksdk.weights.gguf_header` into plain
Python metadata, and tensor bytes are never copied: a :class:`TensorView` is a numpy view into the mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType, Keys

from ksdk.errors import ModelFileError, UnsupportedModelError
from ksdk.weights.gguf_header import GGUF_MAGIC, GGUFHeader, TensorInfo, read_header
from ksdk.weights.quants import dequantize

__all__ = ["GGUFFile", "TensorView", "require_architecture", "split_paths"]

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
    # before mapping: an empty file cannot be mapped, and a short one deserves "not GGUF", not "truncated"
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if head != GGUF_MAGIC:
        found = "an empty file" if not head else f"it starts with {head!r}"
        raise ModelFileError(f"{path} is not a GGUF file: {found}, expected magic {GGUF_MAGIC!r}")


@dataclass(frozen=True)
class _Part:
    """One file of the model: its parsed header and its read-only mapping."""

    path: Path
    header: GGUFHeader
    file_bytes: np.memmap

    @classmethod
    def open(cls, path: Path) -> _Part:
        _check_magic(path)
        try:
            file_bytes = np.memmap(path, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
        return cls(path, read_header(path, file_bytes), file_bytes)

    def tensor_bytes(self, info: TensorInfo) -> np.memmap:
        begin = self.header.data_offset + info.offset
        return self.file_bytes[begin : begin + info.nbytes]


class GGUFFile:
    """A GGUF model: merged metadata and tensors of one file or all parts of a split set.

    Use :meth:`open`; close with :meth:`close` or a ``with`` block. Views handed out stay valid after
    close (they keep their mapping alive).
    """

    def __init__(self, parts: list[_Part]) -> None:
        self.path = parts[0].path
        self.parts = tuple(p.path for p in parts)
        self._files = parts
        metadata: dict[str, Any] = {}
        self._tensors: dict[str, tuple[_Part, TensorInfo]] = {}
        for part in parts:
            for key, value in part.header.metadata.items():
                if not key.startswith(_SPLIT_PREFIX):  # split.* is per-part bookkeeping
                    metadata.setdefault(key, value)
            for info in part.header.tensors:
                if info.name in self._tensors:
                    raise ModelFileError(f"tensor {info.name!r} appears twice in the split set (again in {part.path})")
                self._tensors[info.name] = (part, info)
        self.metadata: Mapping[str, Any] = MappingProxyType(metadata)
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
        return cls([_Part.open(p) for p in split_paths(target)])

    def _check_split_counts(self) -> None:
        first = self._files[0].header.metadata
        count = first.get(Keys.Split.LLM_KV_SPLIT_COUNT)
        if count is not None and count != len(self.parts):
            raise ModelFileError(
                f"{self.path} says {Keys.Split.LLM_KV_SPLIT_COUNT} = {count}, but {len(self.parts)} part(s) were found"
            )
        n_tensors = first.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
        if n_tensors is not None and n_tensors != len(self._tensors):
            raise ModelFileError(
                f"{self.path} says {Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT} = {n_tensors}, "
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
        found = self._tensors.get(name)
        if found is None:
            raise ModelFileError(f"{self.path} has no tensor {name!r}")
        part, info = found
        shape = info.shape
        raw = part.tensor_bytes(info).reshape(*shape[:-1], -1)  # bytes per row, whatever the type
        return TensorView(name, info.qtype, shape, raw)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the file mappings (views already handed out keep theirs)."""
        self._closed = True
        self._files = []
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
