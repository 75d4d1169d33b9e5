"""Stream a chat answer, then a raw completion with logprobs, from a GGUF model.

    python examples/generate.py [MODEL.gguf]      # default: the tiny random-weight test model

Works the same under trio: ``anyio.run(main, path, backend="trio")``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from ksdk.engine import Engine


async def main(path: Path) -> None:
    engine = Engine.from_gguf(path, max_model_len=512)
    async with engine:
        messages = [{"role": "user", "content": "Write a haiku about paged attention."}]
        print(f"[{engine.model_id}] ", end="")
        async for ev in engine.stream(messages, max_tokens=48, temperature=0.6, seed=7):
            print(ev.reasoning + ev.text, end="", flush=True)
            if ev.finish_reason:
                print(f"\n-- finish_reason={ev.finish_reason} usage={ev.usage}")

        result = await engine.complete("The three primary colors are", max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
        for lp in result.choices[0].logprobs or ():
            alternatives = ", ".join(f"{text!r} {value:.2f}" for _, text, value in lp.top)
            print(f"{lp.token!r:>16} {lp.logprob:6.2f}   top: {alternatives}")
        print(engine.stats())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    else:
        from ksdk.testing import tiny_gguf

        model = tiny_gguf()
    anyio.run(main, model)
