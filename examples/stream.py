"""Stream a chat reply from Python, reasoning and answer apart, with no server in between.

    python examples/stream.py [MODEL.gguf] ["your question"]

Without a GGUF it uses the built-in demo model (random weights: the text is random).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import ksdk
from ksdk.testing import demo_model_path


async def main(path: Path, question: str) -> None:
    engine = ksdk.Engine.from_gguf(path)
    async with engine:  # starts the step loop; closes it (and aborts what runs) on exit
        messages = [{"role": "user", "content": question}]
        finish, usage = None, None
        async for event in engine.stream(messages, max_tokens=64, temperature=0.6, seed=1):
            if event.reasoning:
                print(f"\x1b[2m{event.reasoning}\x1b[0m", end="", flush=True)  # the <think> text, dimmed
            print(event.text, end="", flush=True)
            finish, usage = event.finish_reason or finish, event.usage or usage
        print(f"\n[finish_reason={finish}, {usage}]")

        # Breaking out of a stream (or cancelling the task) aborts the request: the engine frees its KV pages.
        async for event in engine.stream(messages, max_tokens=64):
            print(f"first event only: {event.reasoning or event.text!r}")
            break


if __name__ == "__main__":
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_model_path()
    asyncio.run(main(model, sys.argv[2] if len(sys.argv) > 2 else "Why is the sky blue?"))
