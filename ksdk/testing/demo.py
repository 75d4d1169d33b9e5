"""The built-in demo model: a tiny DeepSeek-V3-architecture model with random weights and the real DeepSeek
tokenizer. Its text is random; it exists so ``ksdk serve`` works on a fresh machine without a download."""

from __future__ import annotations

from pathlib import Path

from ksdk.testing.tiny_models import TinyModelSpec, tiny_gguf

__all__ = ["DEMO_MODEL_NAME", "demo_model_path"]

DEMO_MODEL_NAME = "ksdk-demo-tiny-deepseek-v3"


def demo_model_path() -> Path:
    """Build the demo GGUF on first use (a few seconds) and return its cached path."""
    return tiny_gguf("v3", "Q8_0", spec=TinyModelSpec(seed=7), name=DEMO_MODEL_NAME)
