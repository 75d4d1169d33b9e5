"""Acceptance tests of the engine on the fake model, under asyncio and trio."""

from __future__ import annotations

import random
import threading

import anyio
import pytest

from ksdk.engine import Engine, EngineState
from ksdk.errors import ContextLengthError, EngineBusyError, EngineClosedError, InvalidRequestError, SamplingParamError

from ksdk.outputs import ChatResult

from tests.engine.fakes import CHARS, FakeChatTemplate, FakeModel, FakeTokenizer, make_engine

pytestmark = pytest.mark.anyio

SMALL = dict(max_model_len=64, page_size=4)


def prompt(i: int, length: int) -> str:
    return "".join(CHARS[(i * 7 + k * 3) % 36] for k in range(length))


async def run_alone(prompts: list[str], max_tokens: int, **sampling: object) -> list[tuple[int, ...]]:
    """Each prompt on its own, one after another, on a fresh engine without prefix caching."""
    out = []
    async with make_engine(**SMALL, enable_prefix_caching=False) as engine:
        for p in prompts:
            r = await engine.complete(p, max_tokens=max_tokens, ignore_eos=True, **sampling)
            out.append(r.choices[0].token_ids)
    return out


async def wait_idle(engine: Engine) -> None:
    with anyio.fail_after(10):
        while (s := engine.stats()).running or s.waiting or s.pages_used:
            await anyio.sleep(0.01)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ksdk-engine")]


async def test_greedy_batch_is_token_identical_to_each_request_alone() -> None:
    prompts = [prompt(i, 3 + (i * 5) % 29) for i in range(16)]
    expected = await run_alone(prompts, 12, temperature=0)
    results: dict[int, tuple[int, ...]] = {}
    async with make_engine(**SMALL, max_batch_tokens=24, max_num_seqs=8) as engine:

        async def one(i: int) -> None:
            await anyio.sleep(0.003 * (i % 5))  # staggered arrivals join running decodes
            r = await engine.complete(prompts[i], max_tokens=12, temperature=0, ignore_eos=True)
            results[i] = r.choices[0].token_ids

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(one, i)
        stats = engine.stats()
    assert [results[i] for i in range(16)] == expected
    assert stats.steps_total < 16 * 12  # requests really shared steps


async def test_second_chat_turn_computes_only_its_new_tokens() -> None:
    turn1 = [{"role": "user", "content": "tell me a story"}]

    async def converse(engine: Engine) -> tuple[ChatResult, ChatResult, int]:
        first = await engine.chat(turn1, max_tokens=9, temperature=0, ignore_eos=True)
        turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "ok"}]
        before = engine.stats().computed_tokens_total
        second = await engine.chat(turn2, max_tokens=6, temperature=0, ignore_eos=True)
        return first, second, engine.stats().computed_tokens_total - before

    async with make_engine(**SMALL) as engine:
        first, second, computed = await converse(engine)
    async with make_engine(**SMALL, enable_prefix_caching=False) as engine:
        _, second_nocache, computed_nocache = await converse(engine)
    assert second.text == second_nocache.text
    # the history the cache holds: turn 1's prompt and reply, less the last reply token (never fed back)
    tok, template = FakeTokenizer(), FakeChatTemplate()
    held = tok.encode(template.render(turn1)) + list(first.choices[0].token_ids[:-1])
    turn2 = tok.encode(template.render(turn1 + [{"role": "assistant", "content": first.text},
                                                {"role": "user", "content": "ok"}]))
    common = next(i for i, (a, b) in enumerate(zip([*held, -1], turn2)) if a != b)
    assert common >= 20
    usage = second.usage
    assert usage.cached_tokens == common // 4 * 4  # every full page of the shared history
    assert computed == usage.prompt_tokens - usage.cached_tokens + 5  # new prompt tokens, then 5 decodes
    assert second_nocache.usage.cached_tokens == 0 and computed_nocache == usage.prompt_tokens + 5


async def test_a_cache_too_small_for_all_requests_still_completes_them_all() -> None:
    prompts = [prompt(i, 10 + i) for i in range(8)]
    expected = await run_alone(prompts, 20, temperature=0)
    results: dict[int, tuple[int, ...]] = {}
    async with make_engine(max_model_len=64, page_size=4, kv_cache_tokens=80) as engine:  # 20 pages

        async def one(i: int) -> None:
            r = await engine.complete(prompts[i], max_tokens=20, temperature=0, ignore_eos=True)
            results[i] = r.choices[0].token_ids

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        stats = engine.stats()
    assert [results[i] for i in range(8)] == expected
    assert stats.preemptions_total > 0 and stats.pages_used == 0


async def test_breaks_cancellations_and_aborts_free_every_page_and_thread() -> None:
    rng = random.Random(0)
    engine = make_engine(**SMALL, max_num_seqs=16, kv_cache_tokens=512)
    outcomes: dict[str, int] = {"done": 0, "break": 0, "cancel": 0, "abort": 0}
    async with engine:

        async def one(i: int, mode: str) -> None:
            stream = engine.generate(prompt(i, 2 + i % 17), request_id=f"r{i}", max_tokens=6 + i % 7,
                                     temperature=0.8, seed=i)
            if mode == "cancel":
                with anyio.move_on_after(rng.random() * 0.02):
                    async for _ in stream:
                        pass
            elif mode == "abort":
                async for ev in stream:
                    engine.abort(f"r{i}")
                    if ev.finish_reason is not None:
                        assert ev.finish_reason in ("abort", "length", "stop")
            else:
                async for ev in stream:
                    if mode == "break" and ev.token_ids:
                        break
            outcomes[mode] += 1

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i, rng.choice(list(outcomes)))
                if i % 10 == 0:
                    await anyio.sleep(0)
        await wait_idle(engine)
        stats = engine.stats()
    assert sum(outcomes.values()) == 200 and min(outcomes.values()) > 0
    assert stats.pages_free == stats.pages_total and stats.running == stats.waiting == 0
    assert stats.requests_aborted > 0 and stats.requests_finished > 0
    assert engine.state is EngineState.CLOSED and not engine_threads() and not engine._channels


async def test_seeded_sampling_is_reproducible_and_choices_are_independent() -> None:
    kw = dict(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    async with make_engine(**SMALL) as engine:
        alone = (await engine.complete("abcdef", **kw)).choices[0].token_ids  # type: ignore[arg-type]
        crowd: list[tuple[int, ...]] = []

        async def other(i: int) -> None:
            await engine.complete(prompt(i, 9), max_tokens=10, temperature=1.2, ignore_eos=True)

        async def seeded() -> None:
            crowd.append((await engine.complete("abcdef", **kw)).choices[0].token_ids)  # type: ignore[arg-type]

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(other, i)
            tg.start_soon(seeded)
        three = await engine.complete("abcdef", n=3, **kw)  # type: ignore[arg-type]
        three_again = await engine.complete("abcdef", n=3, **kw)  # type: ignore[arg-type]
    assert crowd == [alone]
    ids = [c.token_ids for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(ids)) == 3
    assert ids == [c.token_ids for c in three_again.choices]
    assert three.usage.completion_tokens == 30 and three.usage.prompt_tokens == 7


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": 3.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 9}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"seed": "x"}, "seed"), ({"bogus": 1}, "bogus"),
])
async def test_invalid_sampling_values_name_the_parameter(kwargs: dict, param: str) -> None:
    async with make_engine(**SMALL) as engine:
        with pytest.raises(SamplingParamError) as info:
            engine.generate("abc", **kwargs)
        assert info.value.param == param and param in str(info.value)
        with pytest.raises(SamplingParamError):
            await engine.chat([{"role": "user", "content": "x"}], **kwargs)


async def test_stop_strings_stop_tokens_and_logprobs() -> None:
    async with make_engine(**SMALL) as engine:
        full = await engine.complete("hello", max_tokens=20, temperature=0, ignore_eos=True)
        text = full.text
        stop = text[5:7]
        cut = await engine.complete("hello", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
        assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
        assert cut.choices[0].stop_reason == stop
        tok = full.choices[0].token_ids[3]
        by_id = await engine.complete("hello", max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[tok])
        assert by_id.choices[0].token_ids == full.choices[0].token_ids[:4] and by_id.choices[0].stop_reason == tok
        lp = await engine.complete("hello", max_tokens=3, temperature=0, logprobs=True, top_logprobs=5,
                                   ignore_eos=True)
        entries = lp.choices[0].logprobs
        assert entries is not None and len(entries) == 3
        assert all(len(e.top) == 5 and e.top[0][0] == e.token_id for e in entries)


async def test_eos_ends_with_stop_unless_ignored() -> None:
    async with make_engine(**SMALL) as engine:
        full = await engine.complete("hello", max_tokens=12, temperature=0, ignore_eos=True)
    eos = full.choices[0].token_ids[4]
    first_eos = full.choices[0].token_ids.index(eos)
    async with make_engine(**SMALL, eos_token_id=eos) as engine:
        ended = await engine.complete("hello", max_tokens=12, temperature=0)
        ignored = await engine.complete("hello", max_tokens=12, temperature=0, ignore_eos=True)
    assert ended.finish_reason == "stop" and ended.choices[0].stop_reason is None
    assert ended.choices[0].token_ids == full.choices[0].token_ids[: first_eos + 1]
    assert ended.text == full.text[:first_eos]  # the EOS token has no text
    assert ignored.choices[0].token_ids == full.choices[0].token_ids


async def test_request_errors_are_clear() -> None:
    engine = make_engine(**SMALL, max_num_seqs=1, max_waiting=1)
    with pytest.raises(EngineClosedError):
        engine.generate("abc")
    async with engine:
        with pytest.raises(ContextLengthError):
            engine.generate("a" * 60, max_tokens=10)
        with pytest.raises(InvalidRequestError):
            engine.generate([9999])
        with pytest.raises(InvalidRequestError):
            engine.stream([{"content": "no role"}])
        long = engine.generate("abc", max_tokens=50, ignore_eos=True)
        with anyio.fail_after(5):
            while engine.stats().running != 1:
                await anyio.sleep(0.005)
        waiting = engine.generate("abd", max_tokens=5, ignore_eos=True)  # max_num_seqs=1: it must wait
        with pytest.raises(EngineBusyError):
            engine.generate("abe")
        await long.aclose()
        assert (await _drain(waiting))[-1].finish_reason == "length"
    with pytest.raises(EngineClosedError):
        engine.generate("abc")


async def test_a_failing_request_fails_alone() -> None:
    model = FakeModel()
    model.fail_on_token = 2 + CHARS.index("x")  # the first prompt token of "xyz" only
    async with make_engine(model, **SMALL) as engine:
        results: dict[str, object] = {}

        async def one(name: str, text: str) -> None:
            try:
                results[name] = (await engine.complete(text, max_tokens=4, ignore_eos=True)).finish_reason
            except RuntimeError as exc:
                results[name] = str(exc)

        async with anyio.create_task_group() as tg:
            for name, text in [("a", "abc"), ("bad", "xyz"), ("b", "def")]:
                tg.start_soon(one, name, text)
        await wait_idle(engine)
    assert results == {"a": "length", "bad": "fake model failure", "b": "length"}


async def test_closing_ends_running_streams_and_the_thread() -> None:
    engine = make_engine(max_model_len=256, page_size=16)
    async with engine:
        stream = engine.generate("abc", max_tokens=250, ignore_eos=True)
        await stream.__anext__()
    events = await _drain(stream)
    assert events[-1].finish_reason == "abort" and not engine_threads()


async def _drain(stream):  # noqa: ANN001, ANN202
    return [ev async for ev in stream]


async def test_the_event_loop_stays_responsive_while_the_model_runs() -> None:
    model = FakeModel()
    model.delay_s = 0.05  # 50 ms per step
    gaps: list[float] = []
    async with make_engine(model, **SMALL) as engine:
        stream = engine.generate("abc", max_tokens=6, ignore_eos=True)
        async with anyio.create_task_group() as tg:

            async def tick() -> None:
                last = anyio.current_time()
                while True:
                    await anyio.sleep(0.002)
                    now = anyio.current_time()
                    gaps.append(now - last)
                    last = now

            tg.start_soon(tick)
            events = await _drain(stream)
            tg.cancel_scope.cancel()
    assert events[-1].finish_reason == "length" and len(gaps) > 20
    assert max(gaps) < 0.04  # never stalled for a whole step
