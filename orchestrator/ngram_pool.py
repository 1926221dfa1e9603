"""The n-gram pool in Redis, shared by every request and orchestrator replica
(the interface: specserve.core.ngram_pool.NgramPool).

A local in-memory pool sits in front of Redis. A read answers from it when the key
was fetched recently; otherwise it fetches the key and waits at most the read budget
(a millisecond or two), and a fetch that takes longer fills the cache for the next
read. Writes go to the local pool at once and to Redis in pipelined batches from a
background task. When Redis fails (stopped, hung, restarting) the pool logs one
warning, serves from the local pool without waiting, probes Redis in the background
and uses it again once it answers.

Keys are namespaced by a fingerprint of the model and tokenizer: a Redis LIST per key
of packed continuations, most recent first, at most `per_key` of them, each key with
a TTL; a sorted set of keys by last write bounds their number (the oldest go first).
"""

from __future__ import annotations

import array
import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

import redis.asyncio as redis

from specserve.core.ngram_pool import InMemoryNgramPool, Key

log = logging.getLogger(__name__)


def _pack(tokens: Sequence[int]) -> bytes:
    return array.array("I", tokens).tobytes()


def _unpack(data: bytes) -> Key:
    return tuple(array.array("I", data).tolist())


class RedisNgramPool:
    def __init__(self, client: redis.Redis, namespace: str, per_key: int = 8, max_keys: int = 500_000,
                 ttl_s: int = 86400, read_budget_s: float = 0.002, refresh_s: float = 2.0, op_timeout_s: float = 0.5,
                 retry_s: float = 1.0, flush_interval_s: float = 0.05, max_pending: int = 20_000, local_keys: int = 100_000,
                 on_lookup: Callable[[bool], None] | None = None):
        self.client = client
        self.on_lookup = on_lookup  # told whether each read found a continuation (metrics)
        self.prefix = f"specserve:ngram:v2:{namespace}:".encode()
        self.index_key = self.prefix + b"index"  # sorted set: key -> time of its last write
        self.per_key = per_key
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self.read_budget_s = read_budget_s
        self.refresh_s = refresh_s
        self.op_timeout_s = op_timeout_s
        self.retry_s = retry_s
        self.flush_interval_s = flush_interval_s
        self.local = InMemoryNgramPool(per_key, local_keys)
        self._fetched: OrderedDict[Key, float] = OrderedDict()  # key -> when Redis last answered for it
        self._inflight: dict[Key, asyncio.Task] = {}
        self._pending: deque[tuple[Key, Key]] = deque(maxlen=max_pending)  # writes not yet sent
        self._writer: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None
        self._down_until = 0.0  # while Redis is failing: no request waits for it before this
        self._failing = False
        self.max_inflight = 16

    def _key(self, key: Key) -> bytes:
        return self.prefix + _pack(key)

    # Reads

    async def get(self, key: Key) -> list[Key]:
        now = time.monotonic()
        fetched_at = self._fetched.get(key)
        if (fetched_at is None or now - fetched_at > self.refresh_s) and self._usable(now):
            task = self._inflight.get(key) or self._fetch(key)
            if task is not None:
                await asyncio.wait({task}, timeout=self.read_budget_s)
        found = list(self.local.peek(key) or ())
        if self.on_lookup is not None:
            self.on_lookup(bool(found))
        return found

    def prefetch(self, keys: Sequence[Key]) -> None:
        """Starts fetching keys a request will soon read, without waiting."""
        if self._usable(time.monotonic()):
            for key in keys:
                if key not in self._fetched and key not in self._inflight:
                    self._fetch(key)

    def _fetch(self, key: Key) -> asyncio.Task | None:
        if len(self._inflight) >= self.max_inflight:
            return None  # Redis is slow: do not pile up requests
        task = asyncio.create_task(self._fetch_into_cache(key))
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return task

    async def _fetch_into_cache(self, key: Key) -> None:
        try:
            data = await asyncio.wait_for(self.client.lrange(self._key(key), 0, self.per_key - 1), self.op_timeout_s)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
            self._fail(error)
            return
        remote = [_unpack(item) for item in data]
        local = self.local.peek(key) or []
        # Local entries first: this process's latest writes may not have reached Redis yet.
        self.local.replace(key, list(dict.fromkeys([*local, *remote])))
        self._fetched[key] = time.monotonic()
        self._fetched.move_to_end(key)
        while len(self._fetched) > self.local.max_keys:
            self._fetched.popitem(last=False)

    # Writes

    def put(self, key: Key, continuation: Sequence[int]) -> None:
        continuation = tuple(continuation)
        if not continuation:
            return
        self.local.put(key, continuation)
        self._pending.append((key, continuation))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while self._pending:
            await asyncio.sleep(self.flush_interval_s)
            if not self._usable(time.monotonic()):
                continue
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), 4096))]
            try:
                await asyncio.wait_for(self._write(batch), self.op_timeout_s * 4)
            except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
                self._fail(error)  # the batch is dropped: the pool is a cache

    async def _write(self, batch: list[tuple[Key, Key]]) -> None:
        now = time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            for key, continuation in batch:
                name, value = self._key(key), _pack(continuation)
                pipe.lrem(name, 0, value)
                pipe.lpush(name, value)
                pipe.ltrim(name, 0, self.per_key - 1)
                pipe.expire(name, self.ttl_s)
                pipe.zadd(self.index_key, {name: now})
            pipe.expire(self.index_key, self.ttl_s)
            pipe.zcard(self.index_key)
            *_, count = await pipe.execute()
        if count > self.max_keys:
            oldest = await self.client.zpopmin(self.index_key, count - self.max_keys)
            if oldest:
                await self.client.delete(*[name for name, _ in oldest])

    # Health

    def _usable(self, now: float) -> bool:
        if not self._failing:
            return True
        if now >= self._down_until and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._check())
        return False

    async def _check(self) -> None:
        try:
            await asyncio.wait_for(self.client.ping(), self.op_timeout_s)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as error:
            self._fail(error)
            return
        self._failing = False
        log.info("n-gram pool: Redis answers again; using it")

    def _fail(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_s
        if not self._failing:
            self._failing = True
            log.warning("n-gram pool: Redis failed (%s); serving from the local pool until it answers again",
                        type(error).__name__ + (f": {error}" if str(error) else ""))

    async def close(self) -> None:
        for task in [self._writer, self._probe, *self._inflight.values()]:
            if task is not None:
                task.cancel()
