"""Several replicas behind one orchestrator: least-loaded placement, replicas joining
while requests run, and streams that survive a replica killed mid-stream (SIGKILL),
token for token equal to a fault-free run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import signal
import subprocess
import sys
import time

import grpc
import pytest

from orchestrator.replicas import ReplicasFull, ReplicaSet, ReplicaTiming
from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig, free_port, wait_serving
from specserve.v1 import model_service_pb2, target_pb2, target_pb2_grpc

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "Roses are red, violets are blue,",
    "Question: what is the capital of France? Answer:",
]
LONG = 400  # tokens per stream: long enough that a kill lands mid-stream


def _replicated(tiny_target_dir, tiny_draft_dir, tmp_path_factory) -> StackConfig:
    return StackConfig(
        target_model=str(tiny_target_dir), draft_model=str(tiny_draft_dir), dtype="float32", port=0, redis="off",
        default_method="draft_model", threads=1, target_replicas=2, draft_replicas=2,
        log_dir=tmp_path_factory.mktemp("replicated-stack-logs"),
        extra_env={"SPECSERVE_CACHE": str(tmp_path_factory.mktemp("replicated-stack-cache"))},  # cost profiles of tmp models
    )


@pytest.fixture(scope="module")
def replicated_stack(tiny_target_dir, tiny_draft_dir, tmp_path_factory):
    with Stack(_replicated(tiny_target_dir, tiny_draft_dir, tmp_path_factory)) as stack:
        yield stack


@pytest.fixture
def fresh_replicated_stack(tiny_target_dir, tiny_draft_dir, tmp_path_factory):
    with Stack(_replicated(tiny_target_dir, tiny_draft_dir, tmp_path_factory)) as stack:
        yield stack


def _streams(address: str, method: str, kill=None, **sampling) -> list:
    """Runs one greedy stream per prompt concurrently; `kill()` runs once every stream has
    produced its first tokens. The results, in prompt order."""
    started = concurrent.futures.ThreadPoolExecutor(len(PROMPTS))
    first_tokens = [0] * len(PROMPTS)

    def run(i: int):
        channel, stub = connect(address)
        with channel:
            def seen(_text, i=i):
                first_tokens[i] += 1
            return generate(stub, build_request(prompt=PROMPTS[i], method=method, max_new_tokens=LONG, **sampling),
                            on_text=seen, timeout_s=300)

    futures = [started.submit(run, i) for i in range(len(PROMPTS))]
    if kill is not None:
        deadline = time.monotonic() + 120
        while not all(first_tokens) and time.monotonic() < deadline:
            time.sleep(0.005)
        kill()
    results = [f.result() for f in futures]
    started.shutdown()
    return results


def test_streams_survive_a_killed_target_and_a_killed_draft(replicated_stack):
    stack = replicated_stack
    expected = {}
    for method in ("draft_model", "prompt_lookup"):
        results = _streams(stack.address, method)
        assert all(len(r.token_ids) > 0 and r.stats.failovers == 0 for r in results)
        expected[method] = [r.token_ids for r in results]
    # Kill one target and one draft while every stream is running (placement spread them).
    victims = [stack.process("target-0"), stack.process("draft-0")]
    results = _streams(stack.address, "draft_model", kill=lambda: [v.send_signal(signal.SIGKILL) for v in victims])
    assert [r.token_ids for r in results] == expected["draft_model"]
    assert sum(r.stats.failovers for r in results) >= 1  # some stream was on the killed replicas
    # After the failure is seen, new requests go to the survivors only: no failovers, same output.
    time.sleep(3)
    for method in ("draft_model", "prompt_lookup"):
        again = _streams(stack.address, method)
        assert [r.token_ids for r in again] == expected[method]
        assert [r.stats.failovers for r in again] == [0] * len(PROMPTS)


def test_seeded_sampled_streams_survive_a_killed_replica_token_for_token(fresh_replicated_stack):
    """Each op draws from a stream keyed by the request's seed and its position, so the op sent
    again to the replica that took over draws what the first attempt would have."""
    stack = fresh_replicated_stack
    sampled = dict(temperature=0.9, top_p=0.95, seed=5)
    expected = [r.token_ids for r in _streams(stack.address, "draft_model", **sampled)]
    victims = [stack.process("target-0"), stack.process("draft-0")]
    results = _streams(stack.address, "draft_model", kill=lambda: [v.send_signal(signal.SIGKILL) for v in victims],
                       **sampled)
    assert sum(r.stats.failovers for r in results) >= 1
    assert [r.token_ids for r in results] == expected
    assert any(r.stats.accepted_tokens for r in results)  # the draft proposed, and the sampler kept some


def _open_sessions(address: str, n: int) -> tuple[grpc.Channel, list[queue.Queue]]:
    """n target sessions held open on one replica directly (each a stream with one start op)."""
    channel = grpc.insecure_channel(address)
    stub = target_pb2_grpc.TargetServiceStub(channel)
    outboxes = []
    for i in range(n):
        outbox: queue.Queue = queue.Queue()
        outbox.put(target_pb2.TargetRequest(op_id=1, start=target_pb2.TargetStart(prompt_token_ids=[1, 2, 3], seed=i)))
        responses = stub.Session(iter(outbox.get, None), timeout=60)
        next(responses)  # the session is open on the replica
        outboxes.append((outbox, responses))
    return channel, outboxes


def test_placement_prefers_the_least_loaded_replica_and_finds_new_ones(tiny_target_dir, tmp_path):
    ports = [free_port(), free_port()]
    processes = [subprocess.Popen([sys.executable, "-m", "target_service", "--model", str(tiny_target_dir), "--port",
                                   str(port), "--threads", "1", "--max-sessions", "4"]) for port in ports]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    listing = tmp_path / "targets.txt"
    listing.write_text(addresses[0] + "\n")
    try:
        for address, process in zip(addresses, processes):
            wait_serving(address, 120, process)
        channel, held = _open_sessions(addresses[0], 3)

        async def scenario():
            replicas = ReplicaSet("target", f"file:{listing}", target_pb2_grpc.TargetServiceStub,
                                  ReplicaTiming(resolve_every_s=0.5, poll_every_s=0.2))
            watcher = asyncio.create_task(replicas.run())
            try:
                info = await replicas.wait_healthy(timeout_s=30)
                assert isinstance(info, model_service_pb2.ModelInfo)
                only = replicas.pick()
                assert only.address == addresses[0]  # the only one listed
                replicas.release(only)
                # A replica added while running is found and, less loaded, gets the next sessions.
                listing.write_text("\n".join(addresses) + "\n")
                began = time.monotonic()
                while len(replicas.healthy()) < 2:
                    assert time.monotonic() - began < 10, "the new replica was not found within 10 s"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)  # a poll of both after our placement above
                # (No await between picks: no poll can reset the counts in between.)
                assert [replicas.pick().address for _ in range(3)] == [addresses[1]] * 3
                # Four sessions apiece is both replicas' limit: one more each, then none.
                assert {replicas.pick().address, replicas.pick().address} == set(addresses)
                with pytest.raises(ReplicasFull):
                    replicas.pick()
                # A replica that dies is seen failing and gets no more sessions.
                processes[1].send_signal(signal.SIGKILL)
                began = time.monotonic()
                while addresses[1] in [r.address for r in replicas.healthy()]:
                    assert time.monotonic() - began < 10, "the killed replica still counts as healthy"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                assert replicas.pick().address == addresses[0]  # 3 of 4 sessions held: room for one
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

        asyncio.run(scenario())
        for outbox, responses in held:
            outbox.put(None)
            assert list(responses) == []
        channel.close()
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_placement_between_equally_held_replicas_prefers_lighter_passes():
    """Continuous batching: two replicas with as many sessions; the one whose forward passes
    ran fuller (or has a backlog) gets the next session only after the other."""
    from orchestrator.replicas import Replica, ReplicaSet
    from specserve.v1 import model_service_pb2

    def info(mean_tokens: float, queued: int) -> model_service_pb2.ModelInfo:
        return model_service_pb2.ModelInfo(max_sessions=8, active_sessions=2, batch_token_budget=64,
                                           mean_batch_tokens=mean_tokens, queued_ops=queued)

    replicas = ReplicaSet("target", "a:1,b:2", make_stub=lambda channel: None)
    replicas.replicas = {
        "a:1": Replica("a:1", None, None, info=info(60.0, 3), healthy=True, others=2),
        "b:2": Replica("b:2", None, None, info=info(10.0, 0), healthy=True, others=2),
    }
    assert replicas.pick().address == "b:2"  # equal sessions: lighter passes
    assert replicas.pick().address == "a:1"  # b now holds more sessions
