"""Scale-out and failover, measured with simulated models (a fixed step time per
forward pass, so replicas on one small machine behave like replicas on their own
accelerators): aggregate tokens/s at a concurrency with 1, 2, 4 target replicas and
1, 2 draft replicas, and what a target replica's death adds to a stream that was
using it.

    python -m specserve.bench.replicas --out replicas.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from specserve.client import build_request, connect
from specserve.launcher import Stack, StackConfig

PROMPT = "Count with me: one, two, three, four, five, six, seven, eight, nine, ten."


def _config(args, targets: int, drafts: int, log_dir: Path) -> StackConfig:
    return StackConfig(
        target_model=f"sim:role=target,step_ms={args.target_ms}", draft_model=f"sim:role=draft,step_ms={args.draft_ms},accept={args.accept}",
        tokenizer="smollm2", dtype="float32", port=0, redis="off", default_method=args.method, threads=1,
        target_replicas=targets, draft_replicas=drafts, log_dir=log_dir,
    )


def _stream(stub, max_new_tokens: int, method: str) -> dict:
    """One request: its tokens, wall time, and the arrival time of every message."""
    began = time.perf_counter()
    arrivals, tokens, failovers = [], 0, 0
    for response in stub.Generate(build_request(prompt=PROMPT, method=method, max_new_tokens=max_new_tokens), timeout=600):
        arrivals.append(time.perf_counter())
        tokens += len(response.token_ids)
        if response.finish_reason:
            failovers = response.stats.failovers
    return {"tokens": tokens, "wall_s": time.perf_counter() - began, "arrivals": arrivals, "failovers": failovers}


def throughput(args, targets: int, drafts: int) -> dict:
    with Stack(_config(args, targets, drafts, args.log_dir / f"t{targets}-d{drafts}")) as stack:
        channel, stub = connect(stack.address)
        with channel:
            _stream(stub, 16, args.method)  # warm-up
            requests = max(args.concurrency, args.requests)
            began = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(lambda _: _stream(stub, args.max_new_tokens, args.method), range(requests)))
            wall_s = time.perf_counter() - began
    tokens = sum(r["tokens"] for r in results)
    return {"target_replicas": targets, "draft_replicas": drafts, "requests": requests, "tokens": tokens,
            "wall_s": wall_s, "aggregate_tokens_per_s": tokens / wall_s}


def failover_cost(args) -> dict:
    """A stream's largest gap between messages when its target replica is killed mid-stream,
    against the median gap: the latency the failover added."""
    with Stack(_config(args, 2, 1, args.log_dir / "failover")) as stack:
        channel, stub = connect(stack.address)
        with channel:
            _stream(stub, 16, args.method)
            clean = _stream(stub, args.max_new_tokens, args.method)
            victim = None
            result: dict = {}

            def run() -> None:
                result.update(_stream(stub, args.max_new_tokens, args.method))

            thread = threading.Thread(target=run)
            thread.start()
            time.sleep(clean["wall_s"] / 3)
            # The replica holding the stream: the one with an open session.
            for name in ("target-0", "target-1"):
                if _sessions(stack, name) > 0:
                    victim = name
            stack.process(victim).send_signal(signal.SIGKILL)
            thread.join()
    gaps = [b - a for a, b in zip(result["arrivals"], result["arrivals"][1:])]
    return {"killed": victim, "failovers": result["failovers"], "tokens": result["tokens"],
            "median_gap_ms": statistics.median(gaps) * 1e3, "largest_gap_ms": max(gaps) * 1e3,
            "added_ms": (max(gaps) - statistics.median(gaps)) * 1e3, "prefill_ms": args.target_ms}


def _sessions(stack: Stack, name: str) -> int:
    import grpc

    from specserve.v1 import model_service_pb2, target_pb2_grpc

    index = int(name.rpartition("-")[2])
    with grpc.insecure_channel(stack.target_addresses[index]) as channel:
        info = target_pb2_grpc.TargetServiceStub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=5)
    return info.active_sessions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-ms", type=float, default=20.0, help="simulated target step time")
    parser.add_argument("--draft-ms", type=float, default=2.0, help="simulated draft step time")
    parser.add_argument("--accept", type=float, default=0.7, help="simulated acceptance rate")
    parser.add_argument("--method", default="draft_model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layouts", default="1x1,2x1,4x1,2x2,4x2", help="targets x drafts")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/specserve-bench-replicas"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for layout in args.layouts.split(","):
        targets, drafts = (int(x) for x in layout.split("x"))
        row = throughput(args, targets, drafts)
        rows.append(row)
        print(f"{targets} target x {drafts} draft replicas: {row['aggregate_tokens_per_s']:.1f} tokens/s "
              f"({row['tokens']} tokens, {row['requests']} requests at concurrency {args.concurrency})", flush=True)
    base = rows[0]["aggregate_tokens_per_s"]
    for row in rows:
        row["scaling"] = row["aggregate_tokens_per_s"] / base
    failover = failover_cost(args)
    print(f"failover: {failover['killed']} killed mid-stream; {failover['failovers']} failover(s), largest gap "
          f"{failover['largest_gap_ms']:.0f} ms against a median of {failover['median_gap_ms']:.0f} ms "
          f"(+{failover['added_ms']:.0f} ms; a prefill costs {failover['prefill_ms']:.0f} ms)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "throughput": rows,
                                        "failover": failover}, indent=2))


if __name__ == "__main__":
    main()
