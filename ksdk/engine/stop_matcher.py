"""Stop strings over streamed text: hold back any tail that could still become a stop string."""

from __future__ import annotations

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feed text deltas; get back what is safe to emit and the stop string once one appears.

    Invariant: the held-back text is the longest suffix of everything seen that is a proper prefix of
    some stop string, so a stop string split across tokens is still found and never emitted.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Return ``(text to emit, matched stop string or None)``; after a match, drop the rest."""
        if not self._stops:
            return text, None
        buf = self._held + text
        hits = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            at, stop = min(hits)
            self._held = ""
            return buf[:at], stop
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release held text (the output ended for another reason)."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
