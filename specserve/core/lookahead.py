"""Lookahead decoding (Fu et al. 2024): Jacobi iteration and n-gram verification in one pass.

One target forward pass per step scores three things side by side:
- the pending token (the last generated one, at position p = committed length);
- the *lookahead branch*: a window of W columns and L <= N-1 levels of guessed tokens,
  level l column i at position p+1+l+i. The target's next token after each token of the
  top level becomes the next level (Jacobi iteration); once N-1 levels exist, column i
  with that new token is an n-gram (N tokens) harvested into the pool;
- the *verification branch*: up to G candidate continuations of the pending token
  (from the pool), each a chain at positions p+1, p+2, ...

The attention mask keeps them apart: a candidate token sees the cache, the pending
token and its own candidate's earlier tokens; a window token at (l, i) sees the cache,
the pending token, level 0's columns 0..i and column i's levels below l (the tokens at
positions p+1 .. p+i+l). Only the accepted candidate tokens' KV is kept.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specserve.core.acceptance import Verdict

MAX_WINDOW = 32
MAX_NGRAM = 8
MAX_GUESSES = 32


@dataclass(frozen=True)
class LookaheadShape:
    """window W (columns of the Jacobi window), ngram N (n-gram length: N-1 levels),
    guesses G (candidates verified per step)."""

    window: int = 5
    ngram: int = 4
    guesses: int = 5

    def __post_init__(self) -> None:
        for name, low, high in (("window", 1, MAX_WINDOW), ("ngram", 2, MAX_NGRAM), ("guesses", 0, MAX_GUESSES)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name}: must be in [{low}, {high}], got {value}")


class JacobiWindow:
    """The lookahead branch's state: up to N-1 levels of W guessed tokens each.

    Level 0 starts as W tokens drawn from the prompt (any guess will do: the window's
    contents only decide what is proposed, never what is output); each step appends the
    target's tokens after the top level, and once N-1 levels exist drops the oldest.
    """

    def __init__(self, shape: LookaheadShape, prompt: Sequence[int], seed: int):
        self.shape = shape
        rng = random.Random(seed)
        self.levels: list[list[int]] = [[rng.choice(list(prompt)) for _ in range(shape.window)]]

    @property
    def full(self) -> bool:
        return len(self.levels) == self.shape.ngram - 1

    def update(self, next_level: Sequence[int]) -> list[tuple[int, ...]]:
        """Takes the target's token after each top-level token; returns the n-grams harvested
        (one per column, N tokens each) when the window was full, else []."""
        if len(next_level) != self.shape.window:
            raise ValueError(f"expected {self.shape.window} tokens for the next level, got {len(next_level)}")
        ngrams: list[tuple[int, ...]] = []
        if self.full:
            ngrams = [tuple(level[i] for level in self.levels) + (next_level[i],) for i in range(self.shape.window)]
            self.levels.pop(0)
        self.levels.append(list(next_level))
        return ngrams


class CandidatePool:
    """A request's own n-gram pool: first token -> continuations, most recent first.

    Bounded per key (the `per_key` most recent distinct continuations) and in total
    (least recently written keys go first)."""

    def __init__(self, per_key: int = 8, max_keys: int = 4096):
        self.per_key = per_key
        self.max_keys = max_keys
        self._entries: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()

    def add(self, ngram: Sequence[int]) -> None:
        if len(ngram) < 2:
            return
        key, continuation = ngram[0], tuple(ngram[1:])
        entries = [c for c in self._entries.pop(key, []) if c != continuation]
        self._entries[key] = [continuation, *entries][: self.per_key]
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)

    def add_sequence(self, tokens: Sequence[int], n: int, start: int = 0) -> None:
        """Records every n-gram of tokens that ends at index >= start + n - 1."""
        for i in range(max(start, 0), len(tokens) - n + 1):
            self.add(tokens[i : i + n])

    def get(self, token: int) -> list[tuple[int, ...]]:
        return list(self._entries.get(token, ()))


def select_candidates(sources: Sequence[Sequence[Sequence[int]]], guesses: int, max_len: int) -> list[list[int]]:
    """Up to `guesses` distinct candidates (each cut to max_len, none empty), taken from the
    sources in order (earlier sources are trusted more)."""
    chosen: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for source in sources:
        for candidate in source:
            cut = tuple(candidate[:max_len])
            if not cut or cut in seen:
                continue
            # A candidate that is a prefix of one already chosen adds nothing to verify.
            if any(c[: len(cut)] == list(cut) for c in chosen):
                continue
            seen.add(cut)
            chosen.append(list(cut))
            if len(chosen) == guesses:
                return chosen
    return chosen


@dataclass(frozen=True)
class LookaheadLayout:
    """One step's new tokens: [pending, window level 0 .. L-1 (W each), candidates ...]."""

    tokens: list[int]
    positions: list[int]
    visible: torch.Tensor  # [n, n] bool: new token i attends to new token j
    top_rows: list[int]  # rows of the top window level, column order
    candidate_rows: list[list[int]]  # rows of each candidate's tokens


def build_layout(committed_len: int, pending: int, levels: Sequence[Sequence[int]],
                 candidates: Sequence[Sequence[int]]) -> LookaheadLayout:
    width = len(levels[0]) if levels else 0
    tokens, positions = [pending], [committed_len]
    for l, level in enumerate(levels):
        if len(level) != width:
            raise ValueError("every window level must hold the same number of tokens")
        tokens += level
        positions += [committed_len + 1 + l + i for i in range(width)]
    candidate_rows = []
    for candidate in candidates:
        start = len(tokens)
        tokens += candidate
        positions += [committed_len + 1 + j for j in range(len(candidate))]
        candidate_rows.append(list(range(start, len(tokens))))
    n = len(tokens)
    visible = torch.zeros(n, n, dtype=torch.bool)  # [n, n]
    visible[:, 0] = True  # everything follows the pending token
    row = lambda l, i: 1 + l * width + i  # noqa: E731
    for l in range(len(levels)):
        for i in range(width):
            r = row(l, i)
            visible[r, [row(0, c) for c in range(i + 1)]] = True  # level 0 up to this column
            visible[r, [row(k, i) for k in range(1, l + 1)]] = True  # this column's levels up to this one
    for rows in candidate_rows:
        for j, r in enumerate(rows):
            visible[r, rows[: j + 1]] = True
    top_rows = [row(len(levels) - 1, i) for i in range(width)] if levels else []
    return LookaheadLayout(tokens, positions, visible, top_rows, candidate_rows)


def verify_candidates(target_at: Callable[[int], torch.Tensor], candidates: Sequence[Sequence[int]],
                      candidate_rows: Sequence[Sequence[int]], generator: torch.Generator | None
                      ) -> tuple[Verdict, list[int]]:
    """Walks down the candidates while the target agrees; (verdict, rows of the accepted tokens).

    target_at(row) is the target's distribution at the position after that row's token
    (row 0: the pending token): logits when generator is None (greedy: the argmax is the
    target's token), else warped probabilities (sampling). Candidates that agree so far
    share their context, so the first of them stands for all.

    Sampling: at each depth the distinct next tokens x1..xm of the surviving candidates
    are tried in order, each a deterministic draft: xj is accepted with probability
    p(xj), else p loses xj and is renormalised (p <- normalize(max(p - onehot(xj), 0)));
    if none is accepted, a token is drawn from what is left. The token output at each
    depth is thereby distributed exactly as p (see tests/test_lookahead.py).
    """
    survivors = list(range(len(candidates)))
    row, depth, accepted_by = 0, 0, -1
    tokens: list[int] = []
    while True:
        dist = target_at(row)  # [V]
        options = list(dict.fromkeys(candidates[g][depth] for g in survivors if len(candidates[g]) > depth))
        choice = int(torch.argmax(dist).item()) if generator is None else _sample_among(dist, options, generator)
        tokens.append(choice)
        survivors = [g for g in survivors if len(candidates[g]) > depth and candidates[g][depth] == choice]
        if not survivors:
            # The KV kept is the accepted candidate's own (any survivor's would be the same).
            return Verdict(depth, tokens), (list(candidate_rows[accepted_by][:depth]) if depth else [])
        accepted_by = survivors[0]
        row = candidate_rows[accepted_by][depth]
        depth += 1


def _sample_among(probs: torch.Tensor, options: list[int], generator: torch.Generator) -> int:
    """A token distributed as probs [V], equal to one of options whenever rejection sampling
    against each option as a one-hot draft accepts it."""
    residual = probs.clone()
    for token in options:
        mass = residual.sum()
        if mass <= 0:
            break
        u = torch.rand((), generator=generator).item()
        if u * mass.item() < residual[token].item():  # accept with probability p'(x) = residual(x) / mass
            return token
        residual[token] = 0.0
    if residual.sum() <= 0:  # every bit of mass sat on rejected options: only rounding gets here
        return int(torch.multinomial(probs, 1, generator=generator).item())
    return int(torch.multinomial(residual, 1, generator=generator).item())
