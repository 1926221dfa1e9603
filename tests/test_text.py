"""Streaming text: whole characters only, stop strings cut and never leaked."""

from __future__ import annotations

import pytest

from specserve.core.text import IncrementalDetokenizer, StopStringFilter

TEXTS = [
    "Hello, world! Ça va? 東京は大きい都市です。 🚀🎉 done.",
    "def f(x):\n    return x ** 2  # naïve\n",
    "  leading spaces and emoji 👩‍👩‍👧 family",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_text_equals_full_decode(tokenizer, text, step):
    prompt = tokenizer("Say:")["input_ids"]
    ids = tokenizer(text)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_string_cuts_output():
    stops = StopStringFilter(["STOP"])
    out = stops.push("abc ST") + stops.push("OP and more")
    assert out == "abc "
    assert stops.stopped
    assert stops.push("x") == "" and stops.flush() == ""


def test_partial_stop_is_held_back_then_released():
    stops = StopStringFilter(["\n\n"])
    assert stops.push("line\n") == "line"
    assert stops.push("next") == "\nnext"
    assert not stops.stopped


def test_earliest_of_several_stops_wins_and_flush_releases_the_rest():
    stops = StopStringFilter(["bb", "a"])
    assert stops.push("xxbbya") == "xx"
    stops = StopStringFilter(["END"])
    assert stops.push("almost EN") == "almost "
    assert stops.flush() == "EN"
