"""docker-compose.yml, tried without a Docker engine: each service's command and
environment from the file, launched as a local process, must serve a real request."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import yaml

from specserve.client import build_request, connect, generate
from specserve.launcher import free_port, wait_http_ok, wait_serving
from specserve.v1 import orchestrator_pb2 as pb

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def service(compose: dict, name: str) -> tuple[list[str], dict[str, str]]:
    spec = compose["services"][name]
    return list(spec["command"]), {k: str(v) for k, v in spec["environment"].items()}


def test_compose_services_run_as_local_processes(tiny_target_dir, tiny_draft_dir, redis_url, tmp_path):
    compose = yaml.safe_load(COMPOSE.read_text())
    assert set(compose["services"]) == {"redis", "target", "draft", "orchestrator", "gateway"}
    ports = {name: free_port() for name in ("target", "draft", "orchestrator", "gateway")}
    # What Docker would provide: service names resolving to the replicas, models in the image.
    hosts = {"target": f"127.0.0.1:{ports['target']}", "draft": f"127.0.0.1:{ports['draft']}"}
    metrics = {name: free_port() for name in ("target", "draft", "orchestrator")}  # one host: a port each
    overrides = {
        "target": {"SPECSERVE_TARGET_MODEL": str(tiny_target_dir), "SPECSERVE_TARGET_PORT": str(ports["target"]),
                   "SPECSERVE_TARGET_METRICS_PORT": str(metrics["target"])},
        "draft": {"SPECSERVE_DRAFT_MODEL": str(tiny_draft_dir), "SPECSERVE_DRAFT_PORT": str(ports["draft"]),
                  "SPECSERVE_DRAFT_METRICS_PORT": str(metrics["draft"])},
        "orchestrator": {"SPECSERVE_PORT": str(ports["orchestrator"]), "SPECSERVE_TOKENIZER": str(tiny_target_dir),
                         "SPECSERVE_REDIS_URL": redis_url, "SPECSERVE_METRICS_PORT": str(metrics["orchestrator"])},
        "gateway": {"SPECSERVE_HTTP_PORT": str(ports["gateway"]), "SPECSERVE_ORCHESTRATOR_ADDR": f"127.0.0.1:{ports['orchestrator']}"},
    }
    processes = []
    try:
        for name in ("target", "draft", "orchestrator", "gateway"):
            command, environment = service(compose, name)
            assert command[0] == "specserve"
            environment.update(SPECSERVE_HOST="127.0.0.1", SPECSERVE_DTYPE="float32", **overrides[name])
            for key, value in environment.items():
                for host, address in hosts.items():
                    value = value.replace(f"//{host}:{50052 if host == 'target' else 50053}", f"//{address}")
                environment[key] = value
            argv = [sys.executable, "-m", "specserve.cli", *command[1:]]
            log = open(tmp_path / f"{name}.log", "wb")
            processes.append(subprocess.Popen(argv, env={**os.environ, **environment}, stdout=log, stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{ports['orchestrator']}"
        wait_serving(address, 300, processes[2])
        channel, stub = connect(address)
        with channel:
            for method in ("autoregressive", "draft_model", "prompt_lookup"):
                result = generate(stub, build_request(prompt="Hello there", method=method, max_new_tokens=8), timeout_s=120)
                assert len(result.token_ids) == 8 and result.finish_reason == pb.LENGTH
        gateway = f"127.0.0.1:{ports['gateway']}"
        wait_http_ok(f"http://{gateway}/health", 60, processes[3])
        client = openai.OpenAI(base_url=f"http://{gateway}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="smollm2", prompt="Hello there", max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
        for name, port in metrics.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert f"specserve_{name}_".encode() in response.read()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)
