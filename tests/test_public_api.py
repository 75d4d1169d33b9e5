"""The public surface: one sorted __all__ per package, every name importable."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["ksdk", "ksdk.engine", "ksdk.models", "ksdk.offload", "ksdk.weights", "ksdk.testing", "gateway"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_importable(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__)
    for symbol in module.__all__:
        assert hasattr(module, symbol), f"{name}.{symbol}"


def test_top_level_api() -> None:
    import ksdk

    for symbol in ("Engine", "SamplingParams", "StreamEvent", "ChatResult", "KsdkError", "Tokenizer"):
        assert symbol in ksdk.__all__
