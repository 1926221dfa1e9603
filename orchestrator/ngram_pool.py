"""An n-gram pool in Redis, shared by every request and orchestrator replica.

Each n-gram of finished sequences maps to the tokens that followed it (the
latest occurrence wins). Prompt lookup consults it when the request's own
tokens hold no match, so text one request produced speeds up the next.
Writes happen after a request ends, off the critical path; a Redis failure
degrades to no pool, never to a failed request.
"""

from __future__ import annotations

import array
import logging
from collections.abc import Callable

import redis.asyncio as redis

log = logging.getLogger(__name__)


def _pack(tokens) -> bytes:
    return array.array("I", tokens).tobytes()


def _unpack(data: bytes) -> list[int]:
    return array.array("I", data).tolist()


class NgramPool:
    def __init__(self, client: redis.Redis, namespace: str, n: int = 3, continuation: int = 16, ttl_s: int = 86400,
                 on_lookup: Callable[[bool], None] | None = None):
        self.client = client
        self.on_lookup = on_lookup  # told whether each lookup found a continuation (metrics)
        self.prefix = f"specserve:ngram:v1:{namespace}:".encode()
        self.n = n
        self.continuation = continuation
        self.ttl_s = ttl_s

    def _key(self, ngram) -> bytes:
        return self.prefix + _pack(ngram)

    async def add(self, tokens: list[int]) -> None:
        """Records every n-gram of tokens with what followed it."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for i in range(len(tokens) - self.n):
                    follow = tokens[i + self.n : i + self.n + self.continuation]
                    pipe.set(self._key(tokens[i : i + self.n]), _pack(follow), ex=self.ttl_s)
                await pipe.execute()
        except redis.RedisError as error:
            log.warning("n-gram pool: write failed: %s", error)

    async def lookup(self, sequence: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the sequence's last n-gram elsewhere; [] if none."""
        if len(sequence) < self.n:
            return []
        try:
            data = await self.client.get(self._key(sequence[-self.n :]))
        except redis.RedisError as error:
            log.warning("n-gram pool: lookup failed: %s", error)
            data = None
        found = _unpack(data)[:k] if data else []
        if self.on_lookup is not None:
            self.on_lookup(bool(found))
        return found
