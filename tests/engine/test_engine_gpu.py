"""The engine with its KV cache, metadata and sampler on a CUDA device (fake model: exact arithmetic)."""

from __future__ import annotations

import anyio
import pytest

from tests.engine.fakes import FakeModel, make_engine

pytestmark = [pytest.mark.anyio, pytest.mark.gpu]

PROMPTS = ["abc", "hello world", "x" * 30, "0123456789" * 2, "q"]


async def run(device: str, **sampling: object) -> list[tuple[tuple[int, ...], ...]]:
    results: dict[int, tuple[tuple[int, ...], ...]] = {}
    async with make_engine(FakeModel(device=device), max_model_len=64, page_size=4, kv_cache_tokens=96,
                           max_batch_tokens=16) as engine:

        async def one(i: int) -> None:
            r = await engine.complete(PROMPTS[i], max_tokens=20, ignore_eos=True, **sampling)
            results[i] = tuple(c.token_ids for c in r.choices)

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        assert engine.stats().preemptions_total > 0 and engine.stats().pages_used == 0
    return [results[i] for i in range(len(PROMPTS))]


async def test_cuda_matches_cpu_greedy_under_preemption() -> None:
    assert await run("cuda", temperature=0) == await run("cpu", temperature=0)


async def test_cuda_seeded_sampling_is_reproducible() -> None:
    kw = dict(temperature=1.0, top_p=0.9, top_k=20, seed=5, n=2, presence_penalty=0.5, logprobs=True, top_logprobs=3)
    first, second = await run("cuda", **kw), await run("cuda", **kw)
    assert first == second and all(len(set(choices)) == 2 for choices in first)
