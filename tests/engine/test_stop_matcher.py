from __future__ import annotations

from ksdk.engine.stop_matcher import StopMatcher


def feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, str | None]:
    matcher, out = StopMatcher(stops), ""
    for piece in pieces:
        text, stop = matcher.push(piece)
        out += text
        if stop is not None:
            return out, stop
    return out + matcher.flush(), None


def test_stop_string_across_token_boundaries_is_found_and_not_emitted() -> None:
    assert feed(("END",), ["hello E", "N", "D and more"]) == ("hello ", "END")


def test_held_prefix_is_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.push("ab E") == ("ab ", None)  # "E" held back
    assert matcher.push("x") == ("Ex", None)
    assert feed(("END",), ["ab EN"]) == ("ab EN", None)  # flushed at the end


def test_earliest_of_several_stops_wins() -> None:
    assert feed(("cd", "b"), ["abcd"]) == ("a", "b")


def test_no_stops_passes_text_through() -> None:
    assert StopMatcher(()).push("x") == ("x", None)
