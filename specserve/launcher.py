"""Starts the services as local processes and stops them: `specserve up`, the demo, tests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specserve.core.tree import TreeShape


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Blocks until the server at address reports SERVING on its overall health."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the process serving {address} exited with code {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become SERVING within {timeout_s:.0f} s")
            time.sleep(0.2)


@dataclass(frozen=True)
class ServiceModel:
    """What one model service is told to run: --engine and --dtype, both resolved."""

    engine: str  # "torch" or "llama.cpp"
    dtype: str  # "float32"/"bfloat16" for torch; "auto" for llama.cpp (the GGUF's own types)


def resolve_services(config: "StackConfig") -> dict[str, ServiceModel]:
    """The target's and the draft's engine and dtype (role -> ServiceModel), resolved once here so
    every replica runs the same, and options that cannot be honoured together are refused before
    anything starts (specserve.loading.IncompatibleOptions). dtype auto is measured with the
    services' thread count (profiles are cached per thread count, so the services then find theirs):
    the target's, or the draft's own when the target runs on llama.cpp."""
    import torch

    from specserve.dtype_choice import resolve_dtype
    from specserve.loading import resolve_engine

    if config.threads:
        torch.set_num_threads(config.threads)
    engine = resolve_engine(config.engine, config.target_model, "cpu", config.dtype)
    if engine == "torch":
        target = ServiceModel(engine, resolve_dtype(config.dtype, config.target_model, "target"))
    else:  # compiled: as asked (auto: float32); llama.cpp: the GGUF's own types
        target = ServiceModel(engine, config.dtype)
    services = {"target": target}
    if config.draft_model:
        draft_dtype = "auto" if config.dtype == "int8" else config.dtype  # drafters run on torch: no int8
        engine = resolve_engine(config.engine, config.draft_model, "cpu", draft_dtype)
        if engine != "torch":
            services["draft"] = ServiceModel(engine, draft_dtype)
        elif target.engine == "torch":
            services["draft"] = ServiceModel(engine, target.dtype)  # the drafts read the target's states in its dtype
        else:
            services["draft"] = ServiceModel(engine, resolve_dtype(draft_dtype, config.draft_model, "draft"))
    return services


def wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Blocks until GET url answers 200 (the gateway's /health: its orchestrator serves)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with code {process.returncode}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.2)


@dataclass
class StackConfig:
    target_model: str = "smollm2"
    draft_model: str | None = None  # None: no draft service
    tokenizer: str | None = None  # None: the target model's
    dtype: str = "auto"  # "auto": measured per machine (specserve.dtype_choice), resolved once for every service
    port: int = 50051  # the orchestrator's; 0 picks a free one
    redis: str = "auto"  # "auto": start redis-server if installed; "off" (no n-gram pool at all); or a redis:// URL
    default_method: str = "prompt_lookup"
    threads: int = 0
    engine: str = "auto"  # the model services' --engine: auto, torch, llama.cpp
    # A feature draft's trees for greedy requests (the orchestrator's --tree-* flags; 0 nodes: chains).
    tree_nodes: int = TreeShape.nodes
    tree_width: int = TreeShape.width
    tree_branch: int = TreeShape.branch
    # Medusa heads beside the target (its --medusa): None: the target's default ("auto": the
    # shipped heads for the default model); "": none; or a checkpoint directory.
    target_medusa: str | None = None
    http_port: int | None = None  # the OpenAI-compatible gateway's; None: no gateway; 0 picks a free one
    served_model_name: str = "smollm2"  # the name the gateway serves the target model under
    metrics: bool = False  # every service serves Prometheus metrics on a free port (Stack.metrics_addresses)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None  # None: services log to this process's stderr
    # Processes of each model service; the orchestrator spreads sessions over them and
    # moves a session when its replica dies.
    target_replicas: int = 1
    draft_replicas: int = 1
    auth_token_file: Path | None = None  # the orchestrator requires a token listed there
    async_draft: str = "auto"  # the orchestrator's --async-draft: off, on, auto

    def __post_init__(self) -> None:
        if self.target_replicas < 1 or self.draft_replicas < 1:
            raise ValueError("target_replicas and draft_replicas must be at least 1")


class Stack:
    """Target, draft (optional), orchestrator and Redis (optional) as child processes."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.address = ""
        self.target_addresses: list[str] = []
        self.draft_addresses: list[str] = []
        self.redis_url = ""
        self.http_address = ""  # the gateway's host:port, when it runs
        self.metrics_addresses: dict[str, str] = {}  # service -> host:port of its /metrics, with config.metrics
        self.services: dict[str, ServiceModel] = {}  # role -> the engine and dtype it runs (resolved at start)
        self._tmp = tempfile.TemporaryDirectory(prefix="specserve-")

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, **self.config.extra_env}
        if self.config.threads:
            env["SPECSERVE_THREADS"] = str(self.config.threads)
        out = None
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.config.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        self.processes.append((name, process))
        return process

    def start(self) -> None:
        from specserve.runtime.models import check_available

        c = self.config
        py = sys.executable
        for spec in {c.target_model, c.tokenizer or c.target_model}:
            check_available(spec)  # a missing model package is named here, not in a service's log
        self.services = resolve_services(c)
        self.redis_url = self._start_redis()
        services = []  # (log name, address, process)
        for role, model, count, addresses in (("target", c.target_model, c.target_replicas, self.target_addresses),
                                              ("draft", c.draft_model, c.draft_replicas, self.draft_addresses)):
            for i in range(count if model else 0):
                name = role if count == 1 else f"{role}-{i}"
                address = f"127.0.0.1:{free_port()}"
                addresses.append(address)
                # Medusa heads beside each target, when configured (else the target's default).
                medusa = ["--medusa", c.target_medusa] if role == "target" and c.target_medusa is not None else []
                run = self.services[role]
                process = self._spawn(name, [py, "-m", f"{role}_service", "--model", model, "--dtype", run.dtype, "--engine", run.engine,
                                             "--port", address.rpartition(":")[2], *self._metrics_flags(name), *medusa])
                services.append((name, address, process))
        port = c.port or free_port()
        self.address = f"127.0.0.1:{port}"
        orchestrator = self._spawn("orchestrator", self._orchestrator_argv(port, self._metrics_flags("orchestrator")))
        for name, address, process in services:
            self._wait(name, address, 600, process)
        self._wait("orchestrator", self.address, 120, orchestrator)
        if c.http_port is not None:
            http_port = c.http_port or free_port()
            self.http_address = f"127.0.0.1:{http_port}"
            gateway = self._spawn("gateway", [py, "-m", "specserve.gateway", "--port", str(http_port), "--orchestrator",
                                              self.address, "--served-model-name", c.served_model_name])
            wait_http_ok(f"http://{self.http_address}/health", 60, gateway)

    def _metrics_flags(self, name: str) -> list[str]:
        if not self.config.metrics:
            return []
        port = free_port()
        self.metrics_addresses[name] = f"127.0.0.1:{port}"
        return ["--metrics-port", str(port)]

    def _orchestrator_argv(self, port: int, extra_args: list[str] = ()) -> list[str]:
        c = self.config
        return [
            sys.executable, "-m", "orchestrator", "--port", str(port), "--target", ",".join(self.target_addresses),
            "--draft", ",".join(self.draft_addresses), "--tokenizer", c.tokenizer or c.target_model,
            # No Redis: the pool stays in the orchestrator's process, unless it is turned off.
            "--redis-url", self.redis_url or ("off" if c.redis == "off" else ""),
            "--default-method", c.default_method, "--tree-nodes", str(c.tree_nodes), "--tree-width", str(c.tree_width),
            "--tree-branch", str(c.tree_branch), "--async-draft", c.async_draft,
            *(["--auth-token-file", str(c.auth_token_file)] if c.auth_token_file else []), *extra_args,
        ]

    def add_orchestrator(self, name: str, extra_args: list[str]) -> str:
        """Another orchestrator on the same target and draft services (e.g. with other flags,
        to compare them side by side); returns its address."""
        port = free_port()
        process = self._spawn(name, self._orchestrator_argv(port, extra_args))
        self._wait(name, f"127.0.0.1:{port}", 120, process)
        return f"127.0.0.1:{port}"

    @property
    def target_address(self) -> str:
        """The first target replica's address (the only one unless target_replicas > 1)."""
        return self.target_addresses[0] if self.target_addresses else ""

    @property
    def draft_address(self) -> str:
        return self.draft_addresses[0] if self.draft_addresses else ""

    def process(self, name: str) -> subprocess.Popen:
        """The child process of that log name (e.g. "target-1"), to stop or kill in tests."""
        return next(process for n, process in self.processes if n == name)

    def _wait(self, name: str, address: str, timeout_s: float, process: subprocess.Popen) -> None:
        """wait_serving, and when the service dies first, the end of its log in the error."""
        try:
            wait_serving(address, timeout_s, process)
        except (RuntimeError, TimeoutError) as error:
            log = self.config.log_dir / f"{name}.log" if self.config.log_dir else None
            if log is None or not log.is_file():
                raise
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"{error}; the end of {log}:\n{tail}") from None

    def _start_redis(self) -> str:
        mode = self.config.redis
        if mode == "off":
            return ""
        if mode != "auto":
            return mode
        server = shutil.which("redis-server")
        if server is None:
            print("redis-server is not installed: running without the shared n-gram pool "
                  "(apt-get install -y redis-server adds it)", file=sys.stderr, flush=True)
            return ""
        port = free_port()
        process = self._spawn("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                        "--dir", self._tmp.name, "--loglevel", "warning", "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"redis://127.0.0.1:{port}/0"
            if process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """Terminates every process, the orchestrator first; kills what does not exit."""
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self._tmp.cleanup()
