"""Limits and failures: a full service, an unreachable target."""

from __future__ import annotations

import queue
import subprocess
import sys

import grpc
import pytest

from specserve.client import build_request, connect, generate
from specserve.launcher import free_port, wait_serving
from specserve.v1 import target_pb2, target_pb2_grpc


@pytest.fixture
def process_group():
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=20)


def start_op(op_id: int = 1) -> target_pb2.TargetRequest:
    return target_pb2.TargetRequest(op_id=op_id, start=target_pb2.TargetStart(prompt_token_ids=[1, 2, 3], seed=0))


def test_a_full_target_answers_resource_exhausted(tiny_target_dir, process_group):
    port = free_port()
    process_group.append(subprocess.Popen([sys.executable, "-m", "target_service", "--model", str(tiny_target_dir),
                                           "--port", str(port), "--max-sessions", "1", "--threads", "1"]))
    address = f"127.0.0.1:{port}"
    wait_serving(address, 120, process_group[0])
    with grpc.insecure_channel(address) as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        outbox: queue.Queue = queue.Queue()
        outbox.put(start_op())
        first = stub.Session(iter(outbox.get, None), timeout=60)  # ends when None is queued
        assert len(next(first).token_ids) == 1  # the one session is open
        second = stub.Session(iter([start_op()]), timeout=60)
        with pytest.raises(grpc.RpcError) as caught:
            next(second)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        outbox.put(None)
        assert list(first) == []
        # The slot is free again once the first stream ends.
        third = stub.Session(iter([start_op()]), timeout=60)
        assert len(next(third).token_ids) == 1


def test_an_unreachable_target_means_not_serving_and_unavailable(tiny_target_dir, process_group):
    port, dead_port = free_port(), free_port()
    process_group.append(subprocess.Popen([sys.executable, "-m", "orchestrator", "--port", str(port),
                                           "--target", f"127.0.0.1:{dead_port}", "--draft", "",
                                           "--tokenizer", str(tiny_target_dir)]))
    address = f"127.0.0.1:{port}"
    with pytest.raises(TimeoutError):
        wait_serving(address, 15, process_group[0])  # listening, but never SERVING
    channel, stub = connect(address)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            generate(stub, build_request(prompt="hello"), timeout_s=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
