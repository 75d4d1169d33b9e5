"""The acceptance tests that matter most, on the real tiny DeepSeek-V3 model (random weights, F32)."""

from __future__ import annotations

import functools

import anyio
import pytest

from ksdk.engine import Engine, EngineConfig

pytestmark = pytest.mark.anyio

PROMPTS = ["The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20", "Hi",
           "def fib(n):\n    return", "Once upon a time, in a land far away, there lived a", "<think>",
           "東京は日本の首都です。", "x", "SELECT * FROM users WHERE id = 42;", "🙂🙃 emoji and   spaces",
           "A much longer prompt that keeps going so that its prefill spans several chunks of the token budget, "
           "and then some more words to be sure", "42", "import numpy as np\nnp.arange(10)", "Привет, мир",
           "The quick brown fox", "\n\n\t tabs and newlines"]


@functools.cache
def _parts(qtype: str = "F32") -> tuple[object, object, object]:
    from ksdk.chat import ChatTemplate
    from ksdk.models import load_model
    from ksdk.testing import tiny_gguf
    from ksdk.tokenizer import Tokenizer
    from ksdk.weights.gguf_file import GGUFFile

    gguf = GGUFFile.open(tiny_gguf("v3", qtype))  # F32: torch experts; Q8_0: native experts
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    return load_model(gguf), tokenizer, ChatTemplate.from_metadata(gguf.metadata, tokenizer)


def tiny_engine(qtype: str = "F32", **config: object) -> Engine:
    model, tokenizer, template = _parts(qtype)
    return Engine(model, tokenizer, model_id="tiny", chat_template=template,  # type: ignore[arg-type]
                  config=EngineConfig(**{"max_model_len": 128, "kv_cache_tokens": 1024, **config}))  # type: ignore[arg-type]


async def alone(prompts: list[str], max_tokens: int, qtype: str = "F32") -> list[tuple[int, ...]]:
    async with tiny_engine(qtype, enable_prefix_caching=False) as engine:
        return [(await engine.complete(p, max_tokens=max_tokens, temperature=0, ignore_eos=True)).choices[0].token_ids
                for p in prompts]


async def together(engine: Engine, prompts: list[str], max_tokens: int) -> list[tuple[int, ...]]:
    results: dict[int, tuple[int, ...]] = {}

    async def one(i: int) -> None:
        await anyio.sleep(0.01 * i)
        r = await engine.complete(prompts[i], max_tokens=max_tokens, temperature=0, ignore_eos=True)
        results[i] = r.choices[0].token_ids

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
async def test_tiny_model_batch_invariance_and_preemption(qtype: str) -> None:
    """16 requests of mixed lengths, arriving at different times, each equal to the same request run alone."""
    assert len(PROMPTS) == 16
    expected = await alone(PROMPTS, 6, qtype)
    async with tiny_engine(qtype, max_batch_tokens=16) as engine:  # chunked prefill, staggered arrivals
        assert await together(engine, PROMPTS, 6) == expected
    async with tiny_engine(qtype, kv_cache_tokens=128, page_size=8) as engine:  # room for one full-length request
        assert await together(engine, PROMPTS, 6) == expected
        assert engine.stats().pages_used == 0


async def test_tiny_model_second_turn_computes_only_its_new_tokens() -> None:
    # raw token ids: the R1 chat template renders an earlier answer without its "<think>\n" opener, so a
    # chat history matches the cache only up to that point (the fake-model test covers chat turns)
    _, tokenizer, _ = _parts()
    turn1 = tokenizer.encode("User: name three colors.\nAssistant:", add_bos=True)  # type: ignore[attr-defined]

    async def converse(engine: Engine) -> tuple[tuple[int, ...], int, int]:
        first = await engine.complete(turn1, max_tokens=8, temperature=0, ignore_eos=True)
        turn2 = turn1 + list(first.choices[0].token_ids) + tokenizer.encode("\nUser: two more?\nAssistant:")  # type: ignore[attr-defined]
        before = engine.stats().computed_tokens_total
        second = await engine.complete(turn2, max_tokens=5, temperature=0, ignore_eos=True)
        assert second.usage.prompt_tokens == len(turn2)
        return second.choices[0].token_ids, second.usage.cached_tokens, engine.stats().computed_tokens_total - before

    async with tiny_engine(page_size=4) as engine:
        ids, cached, computed = await converse(engine)
    async with tiny_engine(page_size=4, enable_prefix_caching=False) as engine:
        ids_nocache, cached_nocache, _ = await converse(engine)
    assert ids == ids_nocache and cached_nocache == 0
    assert cached == (len(turn1) + 8 - 1) // 4 * 4  # every full page of turn 1 and its answer
    assert computed == len(turn1) + 8 + len(tokenizer.encode("\nUser: two more?\nAssistant:")) - cached + 4  # type: ignore[attr-defined]
