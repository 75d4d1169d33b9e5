"""The engine serving the real tiny model on a GPU (native experts on the CPU, decode steps replayed from
whole-step CUDA graphs) gives the CPU engine's greedy tokens, under staggered arrivals and chunked prefill."""

from __future__ import annotations

import pytest
import torch

from ksdk.engine import Engine, EngineConfig
from tests.engine.test_engine_tiny import PROMPTS, _parts, alone, together

pytestmark = [pytest.mark.anyio, pytest.mark.gpu]


async def test_cuda_engine_matches_cpu_greedy_with_step_graphs() -> None:
    from ksdk.models import load_model
    from ksdk.testing import tiny_gguf
    from ksdk.weights.gguf_file import GGUFFile

    expected = await alone(PROMPTS, 6, "Q8_0")
    _, tokenizer, template = _parts("Q8_0")
    model = load_model(GGUFFile.open(tiny_gguf("v3", "Q8_0")), device="cuda", dtype=torch.float32)
    config = EngineConfig(max_model_len=128, kv_cache_tokens=1024, max_batch_tokens=16)
    async with Engine(model, tokenizer, model_id="tiny", chat_template=template, config=config) as engine:
        assert await together(engine, PROMPTS, 6) == expected
        assert engine.stats().pages_used == 0
    assert model.decode_graphs is not None and model.decode_graphs.log.calls > 0  # experts ran as host nodes
