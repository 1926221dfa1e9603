"""The Redis n-gram pool against a real redis-server that the tests stop, pause (SIGSTOP) and
restart: reads stay within their budget, one warning per outage, the pool comes back."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import subprocess
import time

import pytest
import redis
import redis.asyncio as aioredis

from orchestrator.ngram_pool import RedisNgramPool
from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig, free_port

BUDGET_S = 0.002


class RedisProcess:
    """A redis-server of this test's own, on a fixed port so that it can be restarted."""

    def __init__(self, directory):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                                         "--loglevel", "warning"])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGKILL's aftermath otherwise
        self.process.kill()
        self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


def make_pool(url: str, namespace: str = "test", **kwargs) -> RedisNgramPool:
    client = aioredis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.5)
    kwargs.setdefault("retry_s", 0.2)
    kwargs.setdefault("flush_interval_s", 0.01)
    return RedisNgramPool(client, namespace, read_budget_s=BUDGET_S, **kwargs)


async def settle(pool: RedisNgramPool, seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)  # background writes and fetches finish


def test_a_second_process_reads_what_the_first_wrote_bounded_and_namespaced(own_redis):
    async def scenario():
        writer = make_pool(own_redis.url, per_key=3, max_keys=5)
        for i in range(10):
            writer.put((1, 2, 3), [100 + i])
        for key in range(20):
            writer.put((key,), [key + 1, key + 2])
        await settle(writer)
        reader = make_pool(own_redis.url, per_key=3)  # another orchestrator: an empty local cache
        other = make_pool(own_redis.url, namespace="another-model")
        got = [await reader.get((19,)) for _ in range(50)]  # the first reads may come back before Redis
        assert got[-1] == [(20, 21)]
        assert await other.get((19,)) == [] and (await settle(other)) is None and await other.get((19,)) == []
        for pool in (writer, reader, other):
            await pool.close()
            await pool.client.aclose()

    asyncio.run(scenario())
    client = own_redis.client()
    keys = [k for k in client.scan_iter(match=b"specserve:ngram:*") if not k.endswith(b"index")]
    assert 0 < len(keys) <= 5  # bounded in total: the least recently written keys went
    assert all(client.llen(k) <= 3 and 0 < client.ttl(k) <= 86400 for k in keys)  # bounded per key, with a TTL


@pytest.mark.parametrize("outage", ["pause", "kill"])
def test_reads_stay_within_budget_while_redis_is_down_and_the_pool_comes_back(own_redis, outage, caplog):
    caplog.set_level(logging.WARNING, logger="orchestrator.ngram_pool")

    async def scenario():
        pool = make_pool(own_redis.url)
        pool.put((7,), [8, 9])
        await settle(pool)
        assert await pool.get((7,)) == [(8, 9)]
        getattr(own_redis, outage)()
        slowest = 0.0
        for i in range(200):  # ~1 s of reads and writes against a dead Redis
            began = time.perf_counter()
            found = await pool.get((7,)) if i % 2 else await pool.get((1000 + i,))
            slowest = max(slowest, time.perf_counter() - began)
            pool.put((2000 + i,), [i])
            await asyncio.sleep(0.005)
        assert await pool.get((7,)) == [(8, 9)]  # the local pool still answers
        # The budget is 2 ms; waiting for Redis would take its 500 ms timeout. The bound leaves room
        # for a busy machine's scheduling, not for a wait on Redis.
        assert slowest < 0.25, slowest
        if outage == "pause":
            own_redis.resume()
        else:
            own_redis.start()  # a fresh, empty Redis on the same port
        own_redis.client().lpush(pool._key((9,)), bytes(memoryview(bytearray((42).to_bytes(4, "little")))))
        deadline = time.monotonic() + 5
        while await pool.get((9,)) != [(42,)]:  # the pool uses Redis again
            assert time.monotonic() < deadline, "the pool did not use Redis again"
            await asyncio.sleep(0.05)
        pool.put((11,), [12])
        await settle(pool)
        await pool.close()
        await pool.client.aclose()

    asyncio.run(scenario())
    assert own_redis.client().exists(b"specserve:ngram:v2:test:" + (11).to_bytes(4, "little"))  # writes reach it again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_requests_complete_unchanged_while_redis_is_paused_killed_and_restarted(own_redis, tiny_target_dir, tmp_path):
    config = StackConfig(target_model=str(tiny_target_dir), dtype="float32", port=0, redis=own_redis.url,
                         default_method="lookahead", threads=1, log_dir=tmp_path / "logs")
    prompts = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "Once upon a time"]
    with Stack(config) as stack:
        channel, stub = connect(stack.address)

        def outputs():
            results = {}
            for prompt in prompts:
                for method in ("lookahead", "prompt_lookup", "autoregressive"):
                    request = build_request(prompt=prompt, method=method, max_new_tokens=30)
                    request.include_step_timings = True
                    result = generate(stub, request, timeout_s=60)
                    results[prompt, method] = (result.token_ids, max(s.wall_ms for s in result.stats.step_timings))
            return results

        healthy = outputs()
        for (prompt, method), (tokens, _) in healthy.items():
            assert tokens == healthy[prompt, "autoregressive"][0], method
        for outage in ("pause", "kill"):
            getattr(own_redis, outage)()
            for _ in range(2):  # the second time after the pool's cached reads are due for a refresh
                down = outputs()
                assert {k: v[0] for k, v in down.items()} == {k: v[0] for k, v in healthy.items()}, outage
                assert max(v[1] for v in down.values()) < 250, outage  # no step waited out a Redis timeout (500 ms)
                time.sleep(2.5)
            own_redis.resume() if outage == "pause" else own_redis.start()
            time.sleep(1.5)  # the pool's probe finds Redis again
        outputs()
        deadline = time.monotonic() + 5
        while not list(own_redis.client().scan_iter(match=b"specserve:ngram:*")):  # the restarted Redis is written again
            assert time.monotonic() < deadline, "the pool did not write to the restarted Redis"
            time.sleep(0.1)
        channel.close()
    log = (tmp_path / "logs" / "orchestrator.log").read_text()
    assert log.count("n-gram pool: Redis failed") == 2, log  # one warning per outage
