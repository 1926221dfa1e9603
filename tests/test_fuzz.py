"""Fuzzing the public API and the services' wires with hypothesis: every call ends with OK
or a clear status, nothing crashes or hangs, and no session is left behind.

`make test` runs a small seeded run; `make fuzz` runs SPECSERVE_FUZZ_EXAMPLES (10,000)
requests per target.
"""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, seed, settings, strategies as st

from specserve.client import connect
from specserve.v1 import common_pb2, orchestrator_pb2 as pb

EXAMPLES = int(os.environ.get("SPECSERVE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="SPECSERVE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)
# A clear answer to a request that may be bad: never INTERNAL or UNKNOWN (a server fault).
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED,
         grpc.StatusCode.RESOURCE_EXHAUSTED}

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
texts = st.text(max_size=80)
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant", "robot", ""]),
                              content=texts), max_size=3)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=draw(floats), top_k=draw(st.integers(0, 2**32 - 1)),
                                         stop=draw(st.lists(st.text(max_size=300), max_size=18)))
    # Valid lengths stay short so a run takes minutes; the invalid ones cover the limits.
    max_new = draw(st.one_of(st.none(), st.integers(0, 6), st.integers(4097, 2**32 - 1)))
    if max_new is not None:
        sampling.max_new_tokens = max_new
    if draw(st.booleans()):
        sampling.top_p = draw(floats)
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    speculation = pb.SpeculationParams(method=draw(st.integers(0, 8)), fixed_length=draw(st.booleans()))
    if draw(st.booleans()):
        speculation.num_speculative_tokens = draw(st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        speculation.tree_nodes = draw(st.integers(0, 300))
    if draw(st.booleans()):
        speculation.async_draft = draw(st.integers(0, 5))  # 4, 5: not a value of the enum
    request = pb.GenerateRequest(sampling=sampling, speculation=speculation, include_step_timings=draw(st.booleans()))
    which = draw(st.sampled_from(["prompt", "messages", "both", "neither"]))
    if which in ("prompt", "both"):
        request.prompt = draw(texts)
    if which in ("messages", "both"):
        request.messages.extend(draw(messages))
    return request


@pytest.fixture(scope="module")
def orchestrator(tiny_stack):
    channel, stub = connect(tiny_stack.address)
    with channel:
        yield stub


@seed(20261124)
@FUZZ
@given(request=requests())
def test_fuzzed_requests_get_ok_or_a_clear_status(orchestrator, request):
    try:
        for _ in orchestrator.Generate(request, timeout=60):
            pass
    except grpc.RpcError as error:
        assert error.code() in CLEAR, (error.code(), error.details(), request)
        assert error.details(), request


WIRE_METHODS = [  # (service address attribute, method path, kind)
    ("address", "/specserve.v1.Orchestrator/Generate", "unary_stream"),
    ("target_address", "/specserve.v1.TargetService/Session", "stream_stream"),
    ("target_address", "/specserve.v1.TargetService/GetInfo", "unary_unary"),
    ("draft_address", "/specserve.v1.DraftService/Session", "stream_stream"),
    ("draft_address", "/specserve.v1.DraftService/GetInfo", "unary_unary"),
]


@pytest.mark.parametrize("attribute, method, kind", WIRE_METHODS)
def test_raw_bytes_on_every_wire(tiny_stack, attribute, method, kind):
    with grpc.insecure_channel(getattr(tiny_stack, attribute)) as channel:
        call = getattr(channel, kind)(method)  # no (de)serializers: raw bytes both ways

        @seed(hash(method) % 2**32)
        @FUZZ
        @given(payloads=st.lists(st.binary(max_size=256), min_size=1, max_size=4))
        def check(payloads):
            try:
                if kind == "unary_unary":
                    call(payloads[0], timeout=30)
                elif kind == "unary_stream":
                    list(call(payloads[0], timeout=60))
                else:
                    list(call(iter(payloads), timeout=60))
            except grpc.RpcError as error:
                assert error.code() in CLEAR, (error.code(), error.details(), payloads)
                assert error.details(), payloads

        check()
    from tests.test_services import wait_for_sessions

    assert wait_for_sessions(tiny_stack) == (0, 0)


def test_no_service_logged_a_traceback(tiny_stack):
    """Whatever the fuzzing above (and every other test on this stack) sent, no server faulted."""
    for log in sorted(tiny_stack.config.log_dir.glob("*.log")):
        assert "Traceback" not in log.read_text(errors="replace"), log
