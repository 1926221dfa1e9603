"""The n-gram pool shared by requests: key n-gram -> continuations seen after it.

One interface, two backends: `InMemoryNgramPool` here (one process; also the local
cache in front of the Redis backend, orchestrator/ngram_pool.py). Prompt lookup reads
3-token keys (one long continuation), lookahead reads 1-token keys (n-grams after the
pending token) and 3-token keys. A pool only ever changes what is proposed, never
what is output: a pool full of garbage makes generation slower, not different.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

Key = tuple[int, ...]

LOOKUP_KEY = 3  # prompt lookup's key: the last 3 tokens
LOOKUP_TOKENS = 16  # what is recorded after a 3-token key
NGRAM_TOKENS = 7  # what is recorded after a 1-token key (lookahead cuts it to N-1)


class NgramPool(Protocol):
    async def get(self, key: Key) -> list[Key]:
        """Continuations recorded after `key`, most recent first. Returns within the pool's
        read budget (a millisecond or two): a slow or missing backend yields what is at hand."""

    def put(self, key: Key, continuation: Sequence[int]) -> None:
        """Records a continuation; never blocks (a remote backend writes in the background)."""


class InMemoryNgramPool:
    """A pool in this process: at most `per_key` distinct continuations per key (most recent
    first) and `max_keys` keys (the least recently used go first)."""

    def __init__(self, per_key: int = 8, max_keys: int = 100_000):
        self.per_key = per_key
        self.max_keys = max_keys
        self._entries: OrderedDict[Key, list[Key]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: Key) -> list[Key] | None:
        """The entry without waiting; None when the key is unknown here."""
        entries = self._entries.get(key)
        if entries is not None:
            self._entries.move_to_end(key)
        return entries

    async def get(self, key: Key) -> list[Key]:
        return list(self.peek(key) or ())

    def put(self, key: Key, continuation: Sequence[int]) -> None:
        continuation = tuple(continuation)
        if not continuation:
            return
        old = self._entries.pop(key, [])
        self._entries[key] = [continuation, *(c for c in old if c != continuation)][: self.per_key]
        self._trim()

    def replace(self, key: Key, continuations: list[Key]) -> None:
        """Sets a key's entry as a backend returned it (the local cache of a remote pool)."""
        self._entries.pop(key, None)
        self._entries[key] = continuations[: self.per_key]
        self._trim()

    def _trim(self) -> None:
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)


def record_sequence(pool: NgramPool, tokens: Sequence[int], start: int = 0) -> None:
    """Records what followed every 3-token key (for prompt lookup) and every token (for
    lookahead) in tokens, for positions from `start` on (pass the prompt's length to skip
    what the prompt alone already says; keys overlapping it are still recorded)."""
    tokens = list(tokens)
    for i in range(max(start - LOOKUP_KEY, 0), len(tokens) - LOOKUP_KEY):
        pool.put(tuple(tokens[i : i + LOOKUP_KEY]), tokens[i + LOOKUP_KEY : i + LOOKUP_KEY + LOOKUP_TOKENS])
    for i in range(max(start - 1, 0), len(tokens) - 1):
        pool.put((tokens[i],), tokens[i + 1 : i + 1 + NGRAM_TOKENS])


def lookup_fallback(pool: NgramPool) -> Callable[[list[int], int], Awaitable[list[int]]]:
    """Prompt lookup's fallback: up to k tokens recorded after the sequence's last 3 tokens."""

    async def fallback(sequence: list[int], k: int) -> list[int]:
        if len(sequence) < LOOKUP_KEY:
            return []
        found = await pool.get(tuple(sequence[-LOOKUP_KEY:]))
        return list(found[0][:k]) if found else []

    return fallback
