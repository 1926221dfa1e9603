"""LOOKAHEAD through real gRPC services on loopback (tiny random models, fp32, real Redis)."""

from __future__ import annotations

import grpc
import pytest

from specserve.client import build_request, connect, generate
from specserve.v1 import orchestrator_pb2 as pb, target_pb2, target_pb2_grpc

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Once upon a time",
]


@pytest.fixture(scope="module")
def stub(tiny_stack):
    channel, stub = connect(tiny_stack.address)
    yield stub
    channel.close()


def run(stub, **kwargs):
    kwargs.setdefault("max_new_tokens", 30)
    return generate(stub, build_request(**kwargs), timeout_s=120)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_lookahead_equals_autoregressive(stub, prompt):
    plain = run(stub, prompt=prompt, method="autoregressive")
    for window, ngram, guesses in ((1, 2, 1), (4, 3, 4), (6, 5, 8), (3, 4, 0), (None, None, None)):
        result = run(stub, prompt=prompt, method="lookahead", lookahead_window=window, lookahead_ngram=ngram,
                     lookahead_guesses=guesses)
        assert result.token_ids == plain.token_ids, (window, ngram, guesses)
        assert result.text == plain.text
        assert result.stats.method == pb.LOOKAHEAD
        assert result.stats.target_forward_passes <= plain.stats.target_forward_passes
        assert result.stats.mean_accepted_length >= 1.0


def test_sampled_lookahead_with_a_seed_is_reproducible(stub):
    a = run(stub, prompt=PROMPTS[0], method="lookahead", temperature=0.9, top_p=0.95, seed=11)
    b = run(stub, prompt=PROMPTS[0], method="lookahead", temperature=0.9, top_p=0.95, seed=11)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30


def test_a_repeated_request_is_faster_through_the_shared_pool(stub):
    prompt = "A lookahead prompt whose answer the shared pool will remember: okapi"
    first = run(stub, prompt=prompt, method="lookahead", max_new_tokens=40)
    second = run(stub, prompt=prompt, method="lookahead", max_new_tokens=40)
    assert second.token_ids == first.token_ids
    assert second.stats.target_forward_passes < first.stats.target_forward_passes


@pytest.mark.parametrize("field, value", [("lookahead_window", 0), ("lookahead_ngram", 1), ("lookahead_guesses", 99)])
def test_bad_lookahead_parameters_name_the_field(stub, field, value):
    with pytest.raises(grpc.RpcError) as caught:
        run(stub, prompt=PROMPTS[2], method="lookahead", **{field: value})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"speculation.{field}" in caught.value.details()


def target_session(tiny_stack, *ops):
    with grpc.insecure_channel(tiny_stack.target_address) as channel:
        requests = [target_pb2.TargetRequest(op_id=1, start=target_pb2.TargetStart(prompt_token_ids=[1, 5, 9], seed=0))]
        requests += [target_pb2.TargetRequest(op_id=2 + i, lookahead=op) for i, op in enumerate(ops)]
        return list(target_pb2_grpc.TargetServiceStub(channel).Session(iter(requests), timeout=30))


def test_target_lookahead_op_keeps_only_accepted_tokens(tiny_stack):
    start, step = target_session(tiny_stack, target_pb2.TargetLookahead(
        committed_len=3, pending_token=7, window=3, window_tokens=[11, 12, 13, 21, 22, 23],
        candidate_tokens=[40, 41, 50], candidate_lengths=[2, 1]))
    assert len(step.lookahead_tokens) == 3
    assert step.committed_len == 3 + 1 + step.accepted == 3 + len(step.token_ids)


@pytest.mark.parametrize("op, code, field", [
    (dict(committed_len=5, pending_token=7, window=2, window_tokens=[1, 2]), grpc.StatusCode.FAILED_PRECONDITION, "committed_len"),
    (dict(committed_len=3, pending_token=7, window=2, window_tokens=[1, 2, 3]), grpc.StatusCode.INVALID_ARGUMENT, "window_tokens"),
    (dict(committed_len=3, pending_token=7, window=0, window_tokens=[1]), grpc.StatusCode.INVALID_ARGUMENT, "window"),
    (dict(committed_len=3, pending_token=7, window=1, window_tokens=[1], candidate_tokens=[4, 5], candidate_lengths=[1]),
     grpc.StatusCode.INVALID_ARGUMENT, "candidate_lengths"),
    (dict(committed_len=3, pending_token=7, window=1, window_tokens=[10**6]), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
])
def test_target_rejects_bad_lookahead_ops(tiny_stack, op, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        target_session(tiny_stack, target_pb2.TargetLookahead(**op))
    assert caught.value.code() == code
    assert field in caught.value.details()
