"""Serving benchmark: N concurrent requests through the engine on a tiny model.

Reports generated tokens/s, the mean step time, and the share of a step spent outside the model's
forward (scheduling, batch building, sampling, detokenizing: the engine's host overhead).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import anyio

from ksdk.engine import Engine, EngineStats

__all__ = ["ServingBenchConfig", "ServingReport", "add_parser", "main", "run_serving_bench"]


@dataclasses.dataclass(frozen=True)
class ServingBenchConfig:
    requests: int = 32
    prompt_tokens: int = 32
    max_tokens: int = 32
    max_num_seqs: int = 32
    model: str | None = None  # a GGUF path; None: the tiny test model (built on first use)
    device: str = "auto"
    backend: str = "asyncio"


@dataclasses.dataclass(frozen=True)
class ServingReport:
    wall_s: float
    prompt_tokens: int
    generated_tokens: int
    steps: int
    mean_step_ms: float
    mean_forward_ms: float

    @property
    def generation_tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def host_share(self) -> float:
        """Share of the mean step spent outside the model forward."""
        return 1.0 - self.mean_forward_ms / self.mean_step_ms if self.mean_step_ms else 0.0

    def lines(self) -> list[str]:
        return [
            f"wall time            {self.wall_s:8.2f} s",
            f"prompt tokens        {self.prompt_tokens:8d}",
            f"generated tokens     {self.generated_tokens:8d}",
            f"generation tokens/s  {self.generation_tokens_per_s:8.1f}",
            f"total tokens/s       {(self.prompt_tokens + self.generated_tokens) / self.wall_s:8.1f}",
            f"steps                {self.steps:8d}",
            f"mean step            {self.mean_step_ms:8.2f} ms",
            f"mean forward         {self.mean_forward_ms:8.2f} ms",
            f"outside the forward  {100 * self.host_share:8.1f} % of a step",
        ]


def _sums(stats: EngineStats) -> tuple[int, float, float]:
    return stats.steps_total, stats.mean_step_ms * stats.steps_total, stats.mean_forward_ms * stats.steps_total


async def _drive(engine: Engine, cfg: ServingBenchConfig) -> ServingReport:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, min(engine.tokenizer.vocab_size, 30000)) for _ in range(cfg.prompt_tokens)] for _ in range(cfg.requests)]
    generated = 0
    await engine.complete(prompts[0][:4], max_tokens=2)  # warm-up outside the timing
    steps0, step_ms0, fwd_ms0 = _sums(engine.stats())

    async def one(ids: list[int]) -> None:
        nonlocal generated
        result = await engine.complete(ids, max_tokens=cfg.max_tokens, temperature=0, ignore_eos=True)
        generated += result.usage.completion_tokens

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for ids in prompts:
            tg.start_soon(one, ids)
    wall = time.perf_counter() - start
    steps1, step_ms1, fwd_ms1 = _sums(engine.stats())
    steps = max(steps1 - steps0, 1)
    return ServingReport(wall, cfg.requests * cfg.prompt_tokens, generated, steps1 - steps0,
                         (step_ms1 - step_ms0) / steps, (fwd_ms1 - fwd_ms0) / steps)


def run_serving_bench(cfg: ServingBenchConfig) -> ServingReport:
    if cfg.model is None:
        from ksdk.testing import tiny_gguf

        path: Path = tiny_gguf()
    else:
        path = Path(cfg.model)
    max_len = cfg.prompt_tokens + cfg.max_tokens
    engine = Engine.from_gguf(path, device=cfg.device, max_model_len=max_len, max_num_seqs=cfg.max_num_seqs,
                              kv_cache_tokens=max(cfg.requests, 1) * max_len + 64, enable_prefix_caching=False)

    async def main() -> ServingReport:
        async with engine:
            return await _drive(engine, cfg)

    return anyio.run(main, backend=cfg.backend)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serving", help="N concurrent requests through the engine: tokens/s, step time",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServingBenchConfig()
    parser.add_argument("--requests", type=int, default=d.requests, help=f"concurrent requests ({d.requests})")
    parser.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help=f"per request ({d.prompt_tokens})")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"generated per request ({d.max_tokens})")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help=f"batch size cap ({d.max_num_seqs})")
    parser.add_argument("--model", help="a GGUF file (default: the tiny test model)")
    parser.add_argument("--device", default=d.device, help="cpu, cuda or auto (default)")
    parser.add_argument("--backend", default=d.backend, choices=["asyncio", "trio"])
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = ServingBenchConfig(requests=args.requests, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                             max_num_seqs=args.max_num_seqs, model=args.model, device=args.device,
                             backend=args.backend)
    report = run_serving_bench(cfg)
    print(f"serving: {cfg.requests} requests x ({cfg.prompt_tokens} prompt + {cfg.max_tokens} generated) tokens")
    print("\n".join(report.lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ksdk.bench.serving``: the same benchmark without the ``ksdk.bench`` dispatcher."""
    parser = argparse.ArgumentParser(prog="python -m ksdk.bench.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
