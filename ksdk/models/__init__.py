"""DeepSeek model definitions, built from GGUF metadata and weights."""

from ksdk.models.config import ModelConfig
from ksdk.models.deepseek import DeepseekForCausalLM

__all__ = ["DeepseekForCausalLM", "ModelConfig", "load_model"]


def load_model(gguf, **options) -> DeepseekForCausalLM:  # noqa: ANN001, ANN003
    """Build the model of an open :class:`ksdk.weights.gguf_file.GGUFFile` (see DeepseekForCausalLM.from_gguf)."""
    return DeepseekForCausalLM.from_gguf(gguf, **options)
