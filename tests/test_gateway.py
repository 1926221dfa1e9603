"""The OpenAI-compatible gateway, called with the official `openai` client, in front of real gRPC
services on loopback (tiny models, fp32): greedy output equals the gRPC API's, streaming and not."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from specserve.client import build_request, connect, generate
from specserve.gateway.translation import from_grpc_error
from specserve.launcher import free_port, wait_http_ok

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, then three more."}]
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
METHODS = ("draft_model", "prompt_lookup", "autoregressive")


@pytest.fixture(scope="module")
def client(gateway_stack):
    return openai.OpenAI(base_url=f"http://{gateway_stack.http_address}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stub(gateway_stack):
    channel, stub = connect(gateway_stack.address)
    yield stub
    channel.close()


def grpc_greedy(stub, method, **kwargs):
    return generate(stub, build_request(method=method, temperature=0.0, **kwargs), timeout_s=120)


def test_models_and_health(client, gateway_stack):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with urllib.request.urlopen(f"http://{gateway_stack.http_address}/health", timeout=5) as response:
        assert response.status == 200


@pytest.mark.parametrize("method", METHODS)
def test_chat_equals_grpc(client, stub, method):
    expected = grpc_greedy(stub, method, messages=MESSAGES, max_new_tokens=24)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                           extra_body={"speculation": {"method": method}})
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == len(expected.token_ids) == 24
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    stats = reply.model_extra["speculation"]
    assert stats["method"] == method
    assert stats["accepted_tokens"] == expected.stats.accepted_tokens
    assert stats["proposed_tokens"] == expected.stats.proposed_tokens
    if method == "draft_model":  # the draft is the target's own model: every proposal is accepted
        assert stats["accepted_tokens"] == stats["proposed_tokens"] > 0 and stats["acceptance_rate"] == 1.0
        assert stats["mean_accepted_length"] > 1.5


@pytest.mark.parametrize("method", ("draft_model", "autoregressive"))
def test_chat_stream_equals_grpc_and_marks_accepted_tokens(client, stub, method):
    expected = grpc_greedy(stub, method, messages=MESSAGES, max_new_tokens=30, num_speculative_tokens=3)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"speculation": {"method": method, "num_speculative_tokens": 3}})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # streamed, not one piece at the end
    assert "".join(c.choices[0].delta.content for c in content) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    marks = [c.model_extra["token_marks"] for c in chunks if c.model_extra.get("token_marks")]
    final = [c.model_extra["speculation"] for c in chunks if c.model_extra.get("speculation")][-1]
    assert sum(m["tokens"] for m in marks) == 30
    assert sum(m["accepted_tokens"] for m in marks) == final["accepted_tokens"] == expected.stats.accepted_tokens
    assert sum(m["proposed_tokens"] for m in marks) == final["proposed_tokens"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    if method == "autoregressive":
        assert all(m["accepted_tokens"] == 0 and m["accepted_text_length"] == 0 for m in marks)
    else:
        # Accepted proposals come first in a chunk, then the target's own token: at most K of them.
        assert any(m["accepted_tokens"] > 0 for m in marks)
        assert all(m["accepted_tokens"] < m["tokens"] or m is marks[-1] for m in marks)
        for chunk, m in zip((c for c in chunks if c.model_extra.get("token_marks")), marks):
            text = chunk.choices[0].delta.content or ""
            assert m["accepted_text_length"] <= len(text)


@pytest.mark.parametrize("stream", (False, True))
def test_completions_equal_grpc(client, stub, stream):
    expected = grpc_greedy(stub, "prompt_lookup", prompt=PROMPT, max_new_tokens=20)
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"speculation": {"method": "prompt_lookup"}})
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        assert len(chunks) > 1
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        reply = client.completions.create(**kwargs)
        assert reply.choices[0].text == expected.text
        assert reply.usage.completion_tokens == 20


def test_stop_and_seed(client, stub):
    plain = grpc_greedy(stub, "autoregressive", prompt=PROMPT, max_new_tokens=20)
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == plain.text[: plain.text.find(stop)]
    sampled = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95, seed=5)
               for _ in range(2)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text
    via_grpc = generate(stub, build_request(prompt=PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=5), timeout_s=60)
    assert sampled[0].choices[0].text == via_grpc.text


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=2), "n"),
    (dict(max_tokens=100_000), "max_tokens"),  # the orchestrator's INVALID_ARGUMENT
    (dict(extra_body={"speculation": {"method": "guessing"}}), "speculation.method"),
    (dict(extra_body={"speculation": {"num_speculative_tokens": 0}}), "speculation.num_speculative_tokens"),
    (dict(temperature=-1), "temperature"),
])
def test_bad_requests_are_400_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=MESSAGES, **{"max_tokens": 8, **kwargs})
    assert error.value.status_code == 400
    assert error.value.body["param"] == param
    assert param in error.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert error.value.body["code"] == "model_not_found"


def _gateway(orchestrator: str, tmp_path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp_path / f"gateway-{port}.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "specserve.gateway", "--port", str(port), "--orchestrator", orchestrator,
                                "--served-model-name", "tiny", *flags], stdout=log, stderr=subprocess.STDOUT)
    return process, f"127.0.0.1:{port}"


def test_api_key_is_required_when_set(gateway_stack, tmp_path):
    process, address = _gateway(gateway_stack.address, tmp_path, "--api-key", "sekret")
    try:
        wait_http_ok(f"http://{address}/health", 60, process)
        wrong = openai.OpenAI(base_url=f"http://{address}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert error.value.status_code == 401
        right = openai.OpenAI(base_url=f"http://{address}/v1", api_key="sekret", max_retries=0)
        assert right.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0).usage.completion_tokens == 4
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_unreachable_orchestrator_is_503(tmp_path):
    process, address = _gateway(f"127.0.0.1:{free_port()}", tmp_path)  # nothing listens there
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/health", timeout=5)
                pytest.fail("/health answered 200 without an orchestrator")
            except urllib.error.HTTPError as error:
                assert error.code == 503
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and process.poll() is None, "the gateway did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        assert error.value.status_code == 503
        assert error.value.body["code"] == "unavailable"
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.FAILED_PRECONDITION, 400),
    (grpc.StatusCode.UNAUTHENTICATED, 401), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.UNIMPLEMENTED, 501), (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.INTERNAL, 500),
])
def test_grpc_status_to_http_status(code, status):
    error = from_grpc_error(code, "speculation.method: something")
    assert error.status == status
    assert error.body()["error"]["param"] == "speculation.method"
    assert error.body()["error"]["type"] == ("rate_limit_error" if status == 429 else "authentication_error" if status == 401
                                            else "invalid_request_error" if status < 500 else "server_error")


def test_retry_after_travels_with_a_429():
    error = from_grpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "every target replica is full; retry in a few seconds", 2000)
    assert error.status == 429 and error.headers == {"Retry-After": "2"}
    assert from_grpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", 1).headers == {"Retry-After": "1"}
