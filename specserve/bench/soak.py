"""Soak: N concurrent streams for M minutes at the target's session limit, with
cancellations and bad requests mixed in, on small randomly initialised models (real
KV caches, real gRPC, loopback only). Reports streams by outcome, errors by status,
leaked sessions, and the resident memory of every process at start and end.

    python -m specserve.bench.soak --minutes 30 --streams 16 --out soak.json   (make soak)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig
from specserve.v1 import draft_pb2_grpc, model_service_pb2, target_pb2_grpc

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Once upon a time, in a land far away, there lived",
    "Roses are red, violets are blue,",
]
METHODS = ("autoregressive", "prompt_lookup", "draft_model")
BAD = [dict(prompt=""), dict(prompt="hi", temperature=float("inf")), dict(prompt="hi", max_new_tokens=0),
       dict(prompt="hi", stop=[""]), dict(prompt="hi", num_speculative_tokens=1000)]


def build_small_model(directory: Path, seed: int, layers: int) -> str:
    """A random Llama with SmolLM2's tokenizer (what the tests use), saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specserve.runtime.models import load_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    load_tokenizer("smollm2").save_pretrained(directory)
    return str(directory)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sessions(stack: Stack) -> dict[str, int]:
    counts = {}
    for name, address, stub in (("target", stack.target_address, target_pb2_grpc.TargetServiceStub),
                                ("draft", stack.draft_address, draft_pb2_grpc.DraftServiceStub)):
        with grpc.insecure_channel(address) as channel:
            counts[name] = stub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=10).active_sessions
    return counts


def soak(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="specserve-soak-"))
    target = build_small_model(work / "target", seed=0, layers=2)
    draft = build_small_model(work / "draft", seed=1, layers=1)
    config = StackConfig(target_model=target, draft_model=draft, dtype="float32", port=0, redis="off", threads=1,
                         default_method="prompt_lookup", log_dir=work / "logs",
                         extra_env={"SPECSERVE_TARGET_MAX_SESSIONS": str(args.streams),
                                    "SPECSERVE_DRAFT_MAX_SESSIONS": str(args.streams)})
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        with channel:
            expected = {(p, m): generate(stub, build_request(prompt=p, method=m, max_new_tokens=args.tokens)).token_ids
                        for p in PROMPTS for m in METHODS}
        pids = {name: process.pid for name, process in stack.processes}
        time.sleep(2)
        rss_start = {name: rss_kib(pid) for name, pid in pids.items()}
        outcomes: Counter = Counter()
        statuses: Counter = Counter()
        failures: Counter = Counter()  # what the unexpected errors said
        lock = threading.Lock()
        stop_at = time.monotonic() + args.minutes * 60

        def client(index: int) -> None:
            rng = random.Random(index)
            channel, stub = connect(stack.address)
            with channel:
                while time.monotonic() < stop_at:
                    roll = rng.random()
                    prompt, method = rng.choice(PROMPTS), rng.choice(METHODS)
                    try:
                        if roll < 0.1:  # a bad request
                            generate(stub, build_request(**rng.choice(BAD)), timeout_s=60)
                            outcome = "bad request accepted"
                        elif roll < 0.2:  # a client that leaves mid-stream
                            call = stub.Generate(build_request(prompt=prompt, method=method, max_new_tokens=args.tokens),
                                                 timeout=60)
                            next(call)
                            call.cancel()
                            outcome = "cancelled"
                        else:
                            result = generate(stub, build_request(prompt=prompt, method=method, max_new_tokens=args.tokens),
                                              timeout_s=120)
                            outcome = "complete and correct" if result.token_ids == expected[(prompt, method)] else "WRONG OUTPUT"
                    except grpc.RpcError as error:
                        outcome = "bad request refused" if error.code() == grpc.StatusCode.INVALID_ARGUMENT else "FAILED"
                        with lock:
                            statuses[error.code().name] += 1
                            if outcome == "FAILED":
                                failures[f"{error.code().name}: {error.details()}"[:160]] += 1
                    with lock:
                        outcomes[outcome] += 1

        with ThreadPoolExecutor(args.streams) as pool:
            list(pool.map(client, range(args.streams)))
        time.sleep(2)
        leaked = sessions(stack)
        rss_end = {name: rss_kib(pid) for name, pid in pids.items()}
    return {"minutes": args.minutes, "streams": args.streams, "tokens_per_stream": args.tokens,
            "outcomes": dict(outcomes), "statuses": dict(statuses), "failures": dict(failures), "leaked_sessions": leaked,
            "rss_kib_start": rss_start, "rss_kib_end": rss_end,
            "rss_growth": {n: rss_end[n] / rss_start[n] - 1 for n in rss_start if rss_start[n]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams, also the services' session limit")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = soak(args)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
