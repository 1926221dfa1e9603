"""What the HTTP gateway adds per streamed chunk over the gRPC API, measured in one run.

The same greedy request streams through both, alternately: straight from the orchestrator
(gRPC) and through the gateway (HTTP, server-sent events, read with the standard library so
that no client library's parsing is counted). Greedy decoding makes both produce the same
chunks, so chunk i's arrival time (from the request's start) can be compared pairwise; the
median of the differences is the latency the gateway adds to a chunk.

    python -m specserve.bench.gateway_overhead --tiny            # a tiny random model: small, steady steps
    python -m specserve.bench.gateway_overhead --dtype bfloat16  # the default model
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path

from specserve.client import build_request, connect
from specserve.launcher import Stack, StackConfig


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


def grpc_arrivals(stub, request) -> list[float]:
    began = time.perf_counter()
    return [time.perf_counter() - began for _ in stub.Generate(request, timeout=300)]


def http_arrivals(address: str, body: dict) -> list[float]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    payload = json.dumps(body)
    began = time.perf_counter()
    connection.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    arrivals = []
    for line in response:
        # Chunks with tokens carry token_marks (the usage chunk and [DONE] do not).
        if line.startswith(b"data: {") and b'"token_marks"' in line:
            arrivals.append(time.perf_counter() - began)
    connection.close()
    return arrivals


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random model instead of --target-model")
    parser.add_argument("--target-model", default="smollm2")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--method", default="autoregressive", help="autoregressive streams one chunk per token")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=20, help="runs per path, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        target = build_tiny_target(Path(tmp)) if args.tiny else args.target_model
        config = StackConfig(target_model=target, draft_model=None, dtype=args.dtype, port=0, redis="off",
                             threads=args.threads, http_port=0, served_model_name="bench", log_dir=Path(tmp) / "logs")
        with Stack(config) as stack:
            prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
            request = build_request(prompt=prompt, method=args.method, max_new_tokens=args.max_tokens, temperature=0.0)
            body = {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                    "speculation": {"method": args.method}}
            channel, stub = connect(stack.address)
            with channel:
                for _ in range(2):  # warm-up: caches, connections, allocators
                    grpc_arrivals(stub, request), http_arrivals(stack.http_address, body)
                differences, first, intervals = [], [], []
                for _ in range(args.runs):
                    via_grpc = grpc_arrivals(stub, request)
                    via_http = http_arrivals(stack.http_address, body)
                    if len(via_grpc) != len(via_http):
                        raise SystemExit(f"the paths streamed {len(via_grpc)} and {len(via_http)} chunks: not comparable")
                    differences += [(h - g) * 1e3 for g, h in zip(via_grpc, via_http)]
                    first.append((via_http[0] - via_grpc[0]) * 1e3)
                    intervals += [(b - a) * 1e3 for a, b in zip(via_grpc, via_grpc[1:])]
    print(f"model {'tiny random (2 layers)' if args.tiny else args.target_model}, {args.dtype}, method {args.method}, "
          f"{args.runs} runs x {len(differences) // args.runs} chunks per path")
    print(f"gRPC chunk interval p50 {statistics.median(intervals):.2f} ms (the model's step, for scale)")
    print(f"gateway adds per chunk: p50 {statistics.median(differences):.3f} ms, p90 {percentile(differences, 0.9):.3f} ms")
    print(f"gateway adds to the first chunk (HTTP request + response start): p50 {statistics.median(first):.3f} ms")


if __name__ == "__main__":
    main()
