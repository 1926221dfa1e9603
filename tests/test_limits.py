"""Limits and deadlines through the stack, with a simulated target whose every forward
pass takes a fixed time: the client's deadline ends a request with DEADLINE_EXCEEDED
and frees its sessions; requests beyond every replica's session limit wait in a
bounded queue, and beyond that get RESOURCE_EXHAUSTED with a retry hint, never an
internal error."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig
from specserve.v1 import model_service_pb2, target_pb2_grpc

STEP_MS = 40  # per simulated target forward pass


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory):
    config = StackConfig(
        target_model=f"sim:role=target,step_ms={STEP_MS}", tokenizer="smollm2", dtype="float32", port=0, redis="off",
        default_method="autoregressive", threads=1, log_dir=tmp_path_factory.mktemp("slow-stack-logs"),
        extra_env={"SPECSERVE_TARGET_MAX_SESSIONS": "2", "SPECSERVE_MAX_QUEUED": "2", "SPECSERVE_QUEUE_TIMEOUT_S": "20"},
    )
    with Stack(config) as stack:
        yield stack


def target_sessions(stack) -> int:
    with grpc.insecure_channel(stack.target_address) as channel:
        info = target_pb2_grpc.TargetServiceStub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=10)
    return info.active_sessions


def test_a_deadline_ends_the_request_and_frees_its_session(slow_stack):
    channel, stub = connect(slow_stack.address)
    with channel:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            generate(stub, build_request(prompt="Count to a thousand", max_new_tokens=500), timeout_s=1.0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < 3
    deadline = time.monotonic() + 1.5  # a second, plus a margin for a loaded machine
    while target_sessions(slow_stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target_sessions(slow_stack) == 0


def test_beyond_the_session_limit_requests_queue_then_are_refused_with_a_hint(slow_stack):
    tokens = 20  # ~20 x 40 ms per request: all six arrive while the first two run
    # The orchestrator polls each replica's load twice a second: let it see the sessions an
    # earlier test left behind gone, so the target's two sessions are both free.
    assert target_sessions(slow_stack) == 0
    time.sleep(1.5)

    def run(_):
        channel, stub = connect(slow_stack.address)
        with channel:
            try:
                return generate(stub, build_request(prompt="Hello", max_new_tokens=tokens), timeout_s=120)
            except grpc.RpcError as error:
                return error

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, range(6)))
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    done = [r for r in results if not isinstance(r, grpc.RpcError)]
    # Two hold the target's two sessions, two wait in the queue and run next, two are refused.
    assert len(done) == 4 and all(len(r.token_ids) == tokens for r in done), [(e.code(), e.details()) for e in errors]
    assert [e.code() for e in errors] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    for error in errors:
        assert "retry" in error.details()
        assert dict(error.trailing_metadata()).get("retry-after-ms") == "2000"
    assert target_sessions(slow_stack) == 0
