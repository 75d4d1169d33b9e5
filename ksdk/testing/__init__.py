"""Tiny DeepSeek-architecture test models built on the spot (no downloads), and their references."""

from ksdk.testing.demo import DEMO_MODEL_NAME, demo_model_path
from ksdk.testing.tiny_models import QTYPE_POLICIES, TinyModelSpec, cache_dir, random_weights, tiny_gguf, write_gguf

__all__ = [
    "DEMO_MODEL_NAME",
    "QTYPE_POLICIES",
    "TinyModelSpec",
    "cache_dir",
    "demo_model_path",
    "random_weights",
    "tiny_gguf",
    "write_gguf",
]
