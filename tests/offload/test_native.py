"""The native module's loader and its small utilities."""

from __future__ import annotations

import importlib

import pytest

from ksdk.errors import NativeExtensionError
from ksdk.offload import native


def test_load_native_names_the_build_step(monkeypatch) -> None:
    def missing(name: str):
        raise ImportError(f"No module named {name!r}")

    native.load_native.cache_clear()
    monkeypatch.setattr(importlib, "import_module", missing)
    try:
        with pytest.raises(NativeExtensionError, match=r"pip install -e \."):
            native.load_native()
    finally:
        monkeypatch.undo()
        native.load_native.cache_clear()
    assert native.load_native().__name__ == "ksdk._native"


def test_cpu_features_and_bandwidth_probe() -> None:
    mod = native.load_native()
    features = mod.cpu_features()
    assert set(features) == {"avx2", "avx512vnni", "amx_int8"}
    assert not features["avx512vnni"] or features["avx2"]
    assert mod.read_bandwidth(8 << 20, 1, 2) > 0.1  # GB/s: any real machine reads 8 MB faster than 80 ms
