"""The three services on loopback (real gRPC servers, tiny random models, fp32, real Redis)."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from specserve.client import build_request, connect, generate
from specserve.v1 import model_service_pb2, orchestrator_pb2 as pb, target_pb2, target_pb2_grpc, draft_pb2_grpc

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
def test_speculative_methods_equal_autoregressive(stub, prompt):
    plain = run(stub, prompt=prompt, method="autoregressive")
    assert len(plain.token_ids) == 30 and plain.finish_reason == pb.LENGTH
    assert plain.stats.target_forward_passes == 30
    for method in ("draft_model", "prompt_lookup"):
        for k in (1, 4, 8):
            for fixed in (True, False):
                result = run(stub, prompt=prompt, method=method, num_speculative_tokens=k, fixed_length=fixed)
                assert result.token_ids == plain.token_ids, (method, k, fixed)
                assert result.text == plain.text
                assert result.stats.method == pb.Method.Value(method.upper())


def test_chat_messages_and_streamed_text(stub, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    result = run(stub, messages=messages, method="draft_model", max_new_tokens=25)
    assert result.messages > 1  # streamed, not one message at the end
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert result.stats.prompt_tokens == len(expected_prompt)


def test_sampling_with_a_seed_is_reproducible(stub):
    for method in ("draft_model", "prompt_lookup", "autoregressive"):
        a = run(stub, prompt=PROMPTS[0], method=method, temperature=0.9, top_p=0.95, seed=11)
        b = run(stub, prompt=PROMPTS[0], method=method, temperature=0.9, top_p=0.95, seed=11)
        assert a.token_ids == b.token_ids, method
    others = [run(stub, prompt=PROMPTS[0], method="draft_model", temperature=0.9, top_p=0.95, seed=s) for s in (12, 13)]
    assert any(o.token_ids != a.token_ids for o in others)  # the seed matters


def test_stop_string_ends_generation(stub):
    plain = run(stub, prompt=PROMPTS[2], method="autoregressive")
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
    assert stop.strip(), "the output should have text to stop at"
    result = run(stub, prompt=PROMPTS[2], method="prompt_lookup", stop=[stop])
    assert result.finish_reason == pb.STOP
    assert result.text == plain.text[: plain.text.find(stop)]


def test_eos_is_reported(stub):
    # Raw prompt ending in the chat end token makes EOS likely only for real models; here
    # we check the reason is one of the defined values and the stats are complete.
    result = run(stub, prompt=PROMPTS[1], method="draft_model")
    assert result.finish_reason in (pb.LENGTH, pb.EOS)
    assert result.stats.generated_tokens == len(result.token_ids)
    assert result.stats.proposed_tokens >= result.stats.accepted_tokens
    assert result.stats.draft_forward_passes > 0
    assert result.stats.wall_time_ms > 0 and result.stats.time_to_first_token_ms > 0


LONG_PROMPT = "word " * 600  # the tiny model's context window is 512 tokens

BAD_REQUESTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt=LONG_PROMPT), "prompt"),
    (dict(prompt="hi", max_new_tokens=0), "sampling.max_new_tokens"),
    (dict(prompt="hi", max_new_tokens=100000), "sampling.max_new_tokens"),
    (dict(prompt="hi", temperature=-0.5), "sampling.temperature"),
    (dict(prompt="hi", temperature=float("inf")), "sampling.temperature"),
    (dict(prompt="hi", temperature=float("nan")), "sampling.temperature"),
    (dict(prompt="hi", top_p=float("nan")), "sampling.top_p"),
    (dict(prompt="hi", stop=["ok", ""]), "sampling.stop[1]"),
    (dict(prompt="hi", stop=["x" * 257]), "sampling.stop[0]"),
    (dict(prompt="hi", top_p=0.0), "sampling.top_p"),
    (dict(prompt="hi", top_p=1.5), "sampling.top_p"),
    (dict(prompt="hi", num_speculative_tokens=0), "speculation.num_speculative_tokens"),
    (dict(prompt="hi", num_speculative_tokens=1000), "speculation.num_speculative_tokens"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "prompt, messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
]


@pytest.mark.parametrize("kwargs, field", BAD_REQUESTS)
def test_bad_input_is_invalid_argument_naming_the_field(stub, kwargs, field):
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, build_request(**kwargs), timeout_s=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field + ":"), caught.value.details()


def test_edge_inputs_have_a_documented_meaning(stub):
    # top_k beyond the vocabulary keeps every token: the same as no filter at all.
    seeded = dict(prompt=PROMPTS[0], method="autoregressive", temperature=0.9, seed=5, max_new_tokens=12)
    assert run(stub, top_k=10**9, **seeded).token_ids == run(stub, top_k=0, **seeded).token_ids
    # Control characters are text like any other.
    assert run(stub, prompt="a\x00b\x07\x1b[0m c", max_new_tokens=4).stats.generated_tokens > 0


def test_unknown_method_is_invalid_argument(stub):
    request = build_request(prompt="hi")
    request.speculation.method = 99
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, request, timeout_s=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("speculation.method:")


def test_medusa_without_heads_is_a_failed_precondition(stub):
    with pytest.raises(grpc.RpcError) as caught:
        run(stub, prompt="hi", method="medusa")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("speculation.method:")


def session_counts(stack) -> tuple[int, int]:
    counts = []
    for address, stub_class in ((stack.target_address, target_pb2_grpc.TargetServiceStub),
                                (stack.draft_address, draft_pb2_grpc.DraftServiceStub)):
        with grpc.insecure_channel(address) as channel:
            counts.append(stub_class(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=5).active_sessions)
    return tuple(counts)


def wait_for_sessions(stack, expected=(0, 0), timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while (counts := session_counts(stack)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


def test_cancelling_mid_stream_leaves_no_session(tiny_stack, stub):
    assert wait_for_sessions(tiny_stack) == (0, 0)
    call = stub.Generate(build_request(prompt=PROMPTS[0], method="draft_model", max_new_tokens=400), timeout=120)
    next(call)  # the first streamed message: both sessions are open now
    assert session_counts(tiny_stack) == (1, 1)
    call.cancel()
    assert wait_for_sessions(tiny_stack) == (0, 0)


def test_failed_requests_leave_no_session(tiny_stack, stub):
    with pytest.raises(grpc.RpcError):
        run(stub, prompt="", method="draft_model")
    run(stub, prompt=PROMPTS[0], method="draft_model", max_new_tokens=3)
    assert wait_for_sessions(tiny_stack) == (0, 0)


def test_target_refuses_a_wrong_committed_length(tiny_stack):
    with grpc.insecure_channel(tiny_stack.target_address) as channel:
        session = target_pb2_grpc.TargetServiceStub(channel).Session(iter([
            target_pb2.TargetRequest(op_id=1, start=target_pb2.TargetStart(prompt_token_ids=[1, 2, 3], seed=0)),
            target_pb2.TargetRequest(op_id=2, verify=target_pb2.TargetVerify(committed_len=7, token_ids=[4])),
        ]), timeout=30)
        first = next(session)
        assert first.op_id == 1 and first.committed_len == 3 and len(first.token_ids) == 1
        with pytest.raises(grpc.RpcError) as caught:
            next(session)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "committed_len" in caught.value.details()


def test_target_rejects_out_of_vocabulary_tokens(tiny_stack):
    with grpc.insecure_channel(tiny_stack.target_address) as channel:
        session = target_pb2_grpc.TargetServiceStub(channel).Session(iter([
            target_pb2.TargetRequest(op_id=1, start=target_pb2.TargetStart(prompt_token_ids=[1, 10**6], seed=0)),
        ]), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            next(session)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_ngram_pool_in_redis_speeds_up_a_repeated_request(tiny_stack, stub):
    prompt = "A prompt whose continuation the pool will remember: zebra"
    first = run(stub, prompt=prompt, method="prompt_lookup", max_new_tokens=40)
    client = redis.Redis.from_url(tiny_stack.redis_url)
    deadline = time.monotonic() + 10
    while not list(client.scan_iter(match=b"specserve:ngram:*", count=1000)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the pool is written after the request, off its critical path
    assert list(client.scan_iter(match=b"specserve:ngram:*", count=1000))
    time.sleep(0.5)
    second = run(stub, prompt=prompt, method="prompt_lookup", max_new_tokens=40)
    assert second.token_ids == first.token_ids
    assert second.stats.target_forward_passes < first.stats.target_forward_passes


def test_health_and_reflection(tiny_stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(tiny_stack.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="specserve.v1.Orchestrator"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert "specserve.v1.Orchestrator" in names
    for address in (tiny_stack.target_address, tiny_stack.draft_address):
        with grpc.insecure_channel(address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
