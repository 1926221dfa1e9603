"""What the HTTP gateway adds per streamed chunk over the gRPC API, measured in one run.

The same greedy request streams through both, alternately: straight from the orchestrator
(gRPC) and through the gateway (HTTP, server-sent events, read with the standard library so
that no client library's parsing is counted). Greedy decoding makes both produce the same
chunks, so chunk i's arrival time (from the request's start) can be compared pairwise; the
median of the differences is the latency the gateway adds to a chunk.

    python -m specserve.bench.gateway_overhead --simulated 20    # no model: a token every 20 ms
    python -m specserve.bench.gateway_overhead --tiny            # a tiny random model: small, steady steps
    python -m specserve.bench.gateway_overhead --dtype bfloat16  # the default model
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from specserve.client import build_request, connect
from specserve.launcher import Stack, StackConfig, free_port, wait_http_ok
from specserve.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc


def build_tiny_target(directory: Path) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer (as the tests build it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specserve.runtime.models import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    load_tokenizer("smollm2").save_pretrained(directory)
    return str(directory)


class PacedOrchestrator(orchestrator_pb2_grpc.OrchestratorServicer):
    """A stand-in orchestrator for --simulated: streams one token per message at a fixed pace,
    so that no model's varying step time blurs what the gateway adds."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.sent: list[float] = []  # when each message of the last request was handed to gRPC

    def Generate(self, request, context):
        count = request.sampling.max_new_tokens
        self.sent = []
        for i in range(count):
            time.sleep(self.interval_s)
            response = pb.GenerateResponse(token_ids=[1000 + i], text=f" word{i}")
            if i == count - 1:
                response.finish_reason = pb.LENGTH
                response.stats.CopyFrom(pb.GenerationStats(generated_tokens=count, target_forward_passes=count,
                                                           method=pb.AUTOREGRESSIVE))
            self.sent.append(time.perf_counter())
            yield response


@contextlib.contextmanager
def simulated_stack(interval_s: float, log_dir: Path):
    """A paced stand-in orchestrator (gRPC, with health) in this process and a real gateway in front."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    paced = PacedOrchestrator(interval_s)
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(paced, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http_port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "gateway.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "specserve.gateway", "--port", str(http_port), "--orchestrator",
                                    f"127.0.0.1:{port}", "--served-model-name", "bench"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http_ok(f"http://127.0.0.1:{http_port}/health", 60, gateway)
        yield SimpleNamespace(address=f"127.0.0.1:{port}", http_address=f"127.0.0.1:{http_port}", paced=paced,
                              processes=[("gateway", gateway), ("orchestrator", SimpleNamespace(pid=os.getpid()))])
    finally:
        gateway.terminate()
        gateway.wait(timeout=20)
        server.stop(grace=None)


def grpc_arrivals(stub, request) -> tuple[float, list[float]]:
    """(when the request was sent, when each message arrived), perf_counter seconds."""
    began = time.perf_counter()
    return began, [time.perf_counter() for _ in stub.Generate(request, timeout=300)]


def http_arrivals(address: str, body: dict) -> tuple[float, list[float]]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    payload = json.dumps(body)
    began = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    arrivals = []
    for line in response:
        # Chunks with tokens carry token_marks (the role chunk, the usage chunk and [DONE] do not).
        if line.startswith(b"data: {") and b'"token_marks"' in line:
            arrivals.append(time.perf_counter())
    connection.close()
    return began, arrivals


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulated", type=float, default=None, metavar="MS",
                        help="no models: a stand-in orchestrator streams a token every MS milliseconds")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model instead of --target-model")
    parser.add_argument("--target-model", default="smollm2")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--method", default="autoregressive", help="autoregressive streams one chunk per token")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20, help="runs per path, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.simulated is not None:
            stack_context = simulated_stack(args.simulated / 1e3, Path(tmp) / "logs")
        else:
            target = build_tiny_target(Path(tmp)) if args.tiny else args.target_model
            stack_context = Stack(StackConfig(target_model=target, draft_model=None, dtype=args.dtype, port=0, redis="off",
                                              threads=args.threads, http_port=0, served_model_name="bench",
                                              log_dir=Path(tmp) / "logs"))
        with stack_context as stack:
            prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
            messages = [{"role": "user", "content": prompt}]
            request = build_request(messages=messages, method=args.method, max_new_tokens=args.max_tokens, temperature=0.0)
            body = {"model": "bench", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                    "speculation": {"method": args.method}}
            channel, stub = connect(stack.address)
            with channel:
                for _ in range(2):  # warm-up: caches, connections, allocators
                    grpc_arrivals(stub, request), http_arrivals(stack.http_address, body)
                differences, first, intervals, transit = [], [], [], {"grpc": [], "http": []}
                pids = {name: process.pid for name, process in stack.processes}
                paced = getattr(stack, "paced", None)
                gateway_cpu = orchestrator_cpu = 0.0
                for _ in range(args.runs):
                    g_began, via_grpc = grpc_arrivals(stub, request)
                    if paced is not None:
                        transit["grpc"] += [(a - s) * 1e3 for s, a in zip(paced.sent, via_grpc)]
                    before = cpu_seconds(pids["gateway"]), cpu_seconds(pids["orchestrator"])
                    h_began, via_http = http_arrivals(stack.http_address, body)
                    gateway_cpu += cpu_seconds(pids["gateway"]) - before[0]
                    orchestrator_cpu += cpu_seconds(pids["orchestrator"]) - before[1]
                    if paced is not None:
                        transit["http"] += [(a - s) * 1e3 for s, a in zip(paced.sent, via_http)]
                    if len(via_grpc) != len(via_http):
                        raise SystemExit(f"the paths streamed {len(via_grpc)} and {len(via_http)} chunks: not comparable")
                    differences += [((h - h_began) - (g - g_began)) * 1e3 for g, h in zip(via_grpc, via_http)]
                    first.append(((via_http[0] - h_began) - (via_grpc[0] - g_began)) * 1e3)
                    intervals += [(b - a) * 1e3 for a, b in zip(via_grpc, via_grpc[1:])]
    model = (f"none (a stand-in orchestrator, a token every {args.simulated} ms)" if args.simulated is not None
             else "tiny random (2 layers)" if args.tiny else args.target_model)
    print(f"model {model}, {args.dtype}, method {args.method}, "
          f"{args.runs} runs x {len(differences) // args.runs} chunks per path")
    print(f"gRPC chunk interval p50 {statistics.median(intervals):.2f} ms (the model's step, for scale)")
    if transit["grpc"]:
        # Exact: the stand-in orchestrator stamped each message as it sent it, on this process's clock.
        g50, h50 = statistics.median(transit["grpc"]), statistics.median(transit["http"])
        print(f"orchestrator -> client per chunk: gRPC p50 {g50:.3f} ms (p90 {percentile(transit['grpc'], 0.9):.3f}), "
              f"through the gateway p50 {h50:.3f} ms (p90 {percentile(transit['http'], 0.9):.3f})")
        print(f"gateway adds per chunk: p50 {h50 - g50:.3f} ms")
    else:
        # Chunk i's arrival from each request's start, paired across the two paths (a delay early in a
        # stream shifts every later chunk: on a busy machine the p90 says more about the load than the gateway).
        print(f"gateway adds per chunk (arrival from the request's start, paired): p50 {statistics.median(differences):.3f} ms, "
              f"p90 {percentile(differences, 0.9):.3f} ms")
    chunks = len(differences)
    orchestrator_note = "" if paced is not None else (
        f", orchestrator {orchestrator_cpu / chunks * 1e3:.3f} ms (with detokenizing and its own gRPC)")
    print(f"CPU per streamed chunk: gateway {gateway_cpu / chunks * 1e3:.3f} ms{orchestrator_note}")
    print(f"gateway adds to the first chunk (HTTP request + response start): p50 {statistics.median(first):.3f} ms")


if __name__ == "__main__":
    main()
