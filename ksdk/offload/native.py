"""Lazy access to the compiled extension ``ksdk._native``."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

from ksdk.errors import NativeExtensionError

__all__ = ["load_native", "native_available"]


@functools.cache
def load_native() -> ModuleType:
    """Return ``ksdk._native``, importing it on first use.

    Raises:
        NativeExtensionError: the extension was not built (or was built for another Python).
    """
    try:
        return importlib.import_module("ksdk._native")
    except ImportError as exc:
        raise NativeExtensionError(
            f"the native extension ksdk._native is not available ({exc}); build it with "
            "`pip install -e .` from the repository root (needs a C++17 compiler and pybind11)"
        ) from exc


@functools.cache
def native_available() -> bool:
    """Whether ``ksdk._native`` was built (without importing it)."""
    return importlib.util.find_spec("ksdk._native") is not None
