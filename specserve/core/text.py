"""Streaming text out of a growing token list: whole characters only, stop strings cut."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Emits the text of each new token batch, never splitting a multi-byte character.

    Decoding a token alone can differ from decoding it in context (leading spaces,
    byte-level pieces), so each step decodes a short window that starts a little
    before the new tokens and emits only what the new tokens added. A trailing
    U+FFFD means an incomplete UTF-8 sequence: hold it back until more tokens arrive.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], context: int = 5):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-context:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is held back, at the end of generation (an incomplete character included)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStringFilter:
    """Cuts the output before the first stop string and holds back what might start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to emit now; sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((self._partial_len(s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """What is held back, at the end of generation (no stop string completed)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_len(self, stop: str) -> int:
        """Length of the longest suffix of pending that is a proper prefix of stop."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0
