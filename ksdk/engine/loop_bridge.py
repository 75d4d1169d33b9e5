"""Hands callables from the step thread to the event loop thread without blocking either side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sniffio

__all__ = ["LoopBridge"]


class LoopBridge:
    """Captures the running loop (asyncio or trio) on creation; ``call_soon`` is safe from any thread."""

    def __init__(self) -> None:
        library = sniffio.current_async_library()
        if library == "trio":
            import trio

            self._call_soon: Callable[..., Any] = trio.lowlevel.current_trio_token().run_sync_soon
        elif library == "asyncio":
            import asyncio

            self._call_soon = asyncio.get_running_loop().call_soon_threadsafe
        else:
            raise RuntimeError(f"unsupported async library {library!r}; ksdk runs under asyncio or trio")

    def call_soon(self, fn: Callable[..., object], *args: object) -> bool:
        """Schedule ``fn(*args)`` on the loop; False if the loop has already finished."""
        try:
            self._call_soon(fn, *args)
        except RuntimeError:  # asyncio: loop closed; trio: RunFinishedError (a RuntimeError)
            return False
        return True
