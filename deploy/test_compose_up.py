"""docker-compose.yml for real: the stack up in a real Docker engine from the project's image, a
Generate through the orchestrator and a chat completion through the gateway, each token for token
plain greedy decoding (transformers' `generate` on the same weights, in this process), then two
target and two draft replicas with one target killed mid-stream, and the stream's output unchanged.

Run by deploy/compose-test.sh (`make compose-test`), which builds the image and names the compose
command; not part of `make test` (it lies outside tests/). The services run in float32 on the
torch engine so that their greedy output is exactly plain decoding's.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from specserve.client import build_request, connect, generate
from specserve.launcher import free_port, wait_http_ok, wait_serving
from specserve.loading import load_model
from specserve.runtime.models import load_tokenizer
from specserve.v1 import orchestrator_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shlex.split(os.environ.get("SPECSERVE_COMPOSE", "docker compose"))
PROJECT = os.environ.get("SPECSERVE_COMPOSE_PROJECT") or f"specserve-test-{os.getpid()}"
REPORT = os.environ.get("SPECSERVE_COMPOSE_REPORT")
START_TIMEOUT_S = 600

QUESTION = "What are three tips for staying productive when working from home?"
ESSAY = "Write a detailed essay about the history of the printing press and how it changed Europe."
SHORT, LONG = 48, 120

timings: dict[str, float] = {}


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    """Plain transformers greedy decoding of the same weights, before the stack takes the CPU."""
    model = load_model("smollm2", "float32").model
    tokenizer = load_tokenizer("smollm2")
    result = {}
    for content, max_new_tokens in ((QUESTION, SHORT), (ESSAY, LONG)):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        tokens = out[0, ids.shape[1]:].tolist()
        result[content] = tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens
    return result


class ComposeStack:
    def __init__(self) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.env = {**os.environ, "SPECSERVE_DTYPE": "float32", "SPECSERVE_GRPC_PUBLISH": str(self.grpc_port),
                    "SPECSERVE_HTTP_PUBLISH": str(self.http_port)}
        self.address = f"127.0.0.1:{self.grpc_port}"

    def compose(self, *args: str) -> None:
        subprocess.run([*COMPOSE, "--project-name", PROJECT, "--file", str(ROOT / "docker-compose.yml"), *args],
                       cwd=ROOT, env=self.env, check=True)

    def containers(self, service: str) -> list[str]:
        """The running containers of a service (by compose's labels, the same in every compose version)."""
        out = subprocess.run(["docker", "ps", "--quiet", "--filter", f"label=com.docker.compose.project={PROJECT}",
                              "--filter", f"label=com.docker.compose.service={service}"],
                             check=True, capture_output=True, text=True).stdout
        return out.split()

    def wait_healthy(self, service: str, count: int, timeout_s: float = START_TIMEOUT_S) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            ids = self.containers(service)
            states = [docker("inspect", "--format", "{{.State.Health.Status}}", i) for i in ids]
            if len(ids) == count and all(state == "healthy" for state in states):
                return ids
            assert time.monotonic() < deadline, f"{service}: {states} after {timeout_s} s"
            time.sleep(1)

    def metric(self, container: str, name: str) -> float:
        """The sum of a metric's samples, read inside the container from its own :9090/metrics."""
        text = docker("exec", container, "python", "-c",
                      "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/metrics').read().decode())")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

    def logs(self) -> None:
        subprocess.run([*COMPOSE, "--project-name", PROJECT, "--file", str(ROOT / "docker-compose.yml"), "logs",
                        "--tail", "40"], cwd=ROOT, env=self.env)


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout.strip()


def chat(stub, content: str, max_new_tokens: int, method: str | None = None, on_text=None):
    request = build_request(messages=[{"role": "user", "content": content}], method=method, max_new_tokens=max_new_tokens)
    return generate(stub, request, on_text=on_text, timeout_s=600)


@pytest.fixture(scope="module")
def stack(expected, request):
    stack = ComposeStack()
    started = time.monotonic()
    try:
        stack.compose("up", "--detach", "--no-build")
        wait_serving(stack.address, START_TIMEOUT_S)
        timings["up_to_orchestrator_serving_s"] = time.monotonic() - started
        first: list[float] = []
        channel, stub = connect(stack.address)
        with channel:
            chat(stub, "Say hello.", 8, on_text=lambda _: first or first.append(time.monotonic()))
        timings["up_to_first_token_s"] = first[0] - started
        wait_http_ok(f"http://127.0.0.1:{stack.http_port}/health", 120)
    except BaseException:
        stack.logs()
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
        raise
    try:
        yield stack
    finally:
        if request.session.testsfailed:
            stack.logs()
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
        if REPORT:
            Path(REPORT).write_text(json.dumps(timings, indent=1))


@pytest.fixture(scope="module")
def stub(stack):
    channel, stub = connect(stack.address)
    yield stub
    channel.close()


@pytest.mark.parametrize("method", ["autoregressive", "prompt_lookup", "draft_model"])
def test_generate_equals_plain_decoding(stub, expected, method):
    generation = chat(stub, QUESTION, SHORT, method)
    assert generation.token_ids == expected[QUESTION]
    assert generation.stats.method == pb.Method.Value(method.upper())


def test_chat_completion_through_the_gateway_equals_plain_decoding(stack, stub, expected):
    plain = chat(stub, QUESTION, SHORT, "autoregressive")
    assert plain.token_ids == expected[QUESTION]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=SHORT, temperature=0)
    assert reply.choices[0].message.content == plain.text
    assert reply.usage.completion_tokens == len(expected[QUESTION])
    assert reply.model_extra["speculation"]["method"] == "prompt_lookup"  # the compose file's default


def test_replicas_and_a_target_killed_mid_stream(stack, stub, expected):
    stack.compose("up", "--detach", "--no-build", "--scale", "target=2", "--scale", "draft=2")
    targets = stack.wait_healthy("target", 2)
    drafts = stack.wait_healthy("draft", 2)

    # The orchestrator finds the new replicas (dns:///, re-resolved every 5 s) and spreads sessions
    # over them: concurrent requests until every replica has served one.
    def served(container: str, role: str) -> float:
        return (stack.metric(container, f"specserve_{role}_sessions_total")
                + stack.metric(container, f"specserve_{role}_active_sessions"))

    deadline = time.monotonic() + 120
    while not all(served(c, "target") for c in targets) or not all(served(c, "draft") for c in drafts):
        assert time.monotonic() < deadline, "the orchestrator did not use every replica"
        threads = [threading.Thread(target=chat, args=(stub, QUESTION, 8, "draft_model")) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    fault_free = chat(stub, ESSAY, LONG, "draft_model")
    assert fault_free.token_ids == expected[ESSAY]
    assert fault_free.stats.failovers == 0

    # The same request again; once it has streamed some tokens, the target replica holding its
    # session is killed (SIGKILL: no goodbye on any connection).
    request = build_request(messages=[{"role": "user", "content": ESSAY}], method="draft_model", max_new_tokens=LONG)
    tokens: list[int] = []
    killed = None
    stats = None
    for response in stub.Generate(request, timeout=600):
        tokens.extend(response.token_ids)
        if response.finish_reason:
            stats = response.stats
        elif killed is None and len(tokens) >= 8:
            busy = [c for c in targets if stack.metric(c, "specserve_target_active_sessions") > 0]
            assert len(busy) == 1, busy
            killed = busy[0]
            docker("kill", killed)
            timings["tokens_before_the_kill"] = len(tokens)
    assert killed is not None and stats is not None
    assert tokens == fault_free.token_ids
    assert stats.failovers >= 1
