"""Continuous batching, measured: aggregate tokens/s and per-request latency at several client
counts, per method, with the target and draft services' batching on and off, in one run.

Each setting gets a fresh stack; at each concurrency level c, c clients pull requests
from a queue of max(c, --requests) prompts (greedy). Every output is compared with the
same request's output at concurrency 1 of the same setting and with batching off.

    python -m specserve.bench.batching --concurrency 1,4,16,64 --out bench-batching   # the real model
    python -m specserve.bench.batching --simulated --target-ms 20 --out bench-batching-sim   # a GPU-like target
    python -m specserve.bench.batching --in-process --dtype bfloat16   # the scheduler alone, no gRPC

--in-process measures what the model thread can do when nothing else needs the CPU: c
threads each decode one sequence (random 60-token prompts, plain greedy steps) through a
`BatchScheduler` on the torch engine in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from specserve.bench.aggregate import median
from specserve.bench.concurrency import run_batch
from specserve.bench.prompts import balanced_subset, default_prompt_files, load_prompts
from specserve.bench.runners.distributed import DistributedRunner
from specserve.launcher import Stack, StackConfig


def _config(args, batching: str, log_dir: Path) -> StackConfig:
    env = {"SPECSERVE_BATCHING": batching}
    if args.simulated:
        return StackConfig(
            target_model=f"sim:role=target,step_ms={args.target_ms},token_ms={args.token_ms}",
            draft_model=f"sim:role=draft,step_ms={args.target_ms * 0.1},accept=0.8", tokenizer="smollm2",
            dtype="float32", port=0, redis="off", threads=1, log_dir=log_dir, extra_env=env)
    return StackConfig(target_model=args.target_model, draft_model=args.draft_model, dtype=args.dtype, engine=args.engine,
                       port=0, redis="off", threads=args.threads, log_dir=log_dir, extra_env=env)


def measure(args) -> dict:
    prompts = balanced_subset(load_prompts(args.prompts or default_prompt_files()), args.limit)
    levels = [int(c) for c in args.concurrency.split(",")]
    methods = args.methods.split(",")
    rows, outputs = [], {}
    for batching in args.batching.split(","):
        with Stack(_config(args, batching, args.out / "logs" / batching)) as stack:
            runner = DistributedRunner(stack.address)
            try:
                for prompt in prompts[:2]:  # warm-up: first-call costs stay out of the figures
                    runner.run(prompt, "autoregressive", 4)
                for level in levels:
                    batch = [prompts[i % len(prompts)] for i in range(max(level, args.requests))]
                    for method in methods:
                        records, wall_s = run_batch(runner, batch, method, level, args.max_new_tokens)
                        for record in records:
                            outputs.setdefault((batching, level, method, record.prompt_id), record.token_ids)
                        generated = sum(r.generated_tokens for r in records)
                        rows.append({
                            "batching": batching, "concurrency": level, "method": method, "requests": len(records),
                            "aggregate_tokens_per_s": generated / wall_s,
                            "median_latency_s": median(r.wall_s for r in records),
                            "median_ms_per_token": median(1e3 * r.wall_s / max(r.generated_tokens, 1) for r in records),
                        })
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                runner.close()
    return {"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
            "mismatches": _mismatches(outputs, levels)}


def measure_in_process(args) -> None:
    import statistics

    import torch

    from specserve.core.sampling import SamplingConfig
    from specserve.loading import load_model
    from specserve.runtime.scheduler import BatchScheduler
    from specserve.runtime.workers import TargetWorker

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = load_model(args.target_model, "bfloat16" if args.dtype == "auto" else args.dtype, engine="torch")
    passes: list = []
    scheduler = BatchScheduler(engine, token_budget=512, on_pass=passes.append)

    def decode(seed: int) -> None:
        prompt = torch.randint(100, 40000, (60,), generator=torch.Generator().manual_seed(seed)).tolist()
        worker = TargetWorker(engine)
        token = scheduler.submit_op(worker.start_op(prompt, SamplingConfig(), 0), worker).result()
        for length in range(len(prompt), len(prompt) + args.max_new_tokens):
            token = scheduler.submit_op(worker.verify_op(length, [token], None), worker).result().tokens[-1]
        scheduler.submit_call(worker.close, drop_ops_of=worker).result()

    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; {engine.dtype_name}")
    for level in (int(c) for c in args.concurrency.split(",")):
        passes.clear()
        began = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            list(pool.map(decode, range(level)))
        wall = time.perf_counter() - began
        steps = [p for p in passes if p.tokens <= level]  # decoding passes (prefills excluded)
        print(f"{level} sessions: {level * args.max_new_tokens / wall:.1f} tokens/s, {statistics.mean(p.sessions for p in passes):.1f} "
              f"sessions per pass, median decoding pass {statistics.median(p.ms for p in steps):.1f} ms")
    scheduler.close()


def _mismatches(outputs: dict, levels: list[int]) -> list[str]:
    """Requests whose output differs from the same request alone (concurrency 1) or unbatched."""
    found = []
    for (batching, level, method, prompt_id), tokens in outputs.items():
        for reference in ((batching, levels[0], method, prompt_id), ("off", levels[0], method, prompt_id)):
            if reference in outputs and outputs[reference] != tokens:
                found.append(f"{method} {prompt_id}: batching {batching} at {level} differs from {reference[0]} at {levels[0]}")
    return found


def _machine() -> dict:
    from specserve.runtime.profile import machine_facts

    return {**machine_facts(), "load_average": os.getloadavg()}


def cpu_description() -> str:
    """The CPU's model name and its flags that matter for matrix products."""
    facts = _machine()
    return f"{facts['cpu']} ({' '.join(facts['flags']) or 'no avx512/amx flags'})"


def table(result: dict) -> str:
    """Markdown: aggregate tokens/s (and its ratio to concurrency 1) and median ms per token."""
    lines = ["| method | batching | clients | aggregate tokens/s | vs 1 client | median ms/token |", "|---|---|---|---|---|---|"]
    base = {(r["method"], r["batching"]): r["aggregate_tokens_per_s"] for r in result["rows"] if r["concurrency"] == min(
        x["concurrency"] for x in result["rows"])}
    for r in sorted(result["rows"], key=lambda r: (r["method"], r["batching"] != "on", r["concurrency"])):
        ratio = r["aggregate_tokens_per_s"] / base[(r["method"], r["batching"])]
        lines.append(f"| {r['method']} | {r['batching']} | {r['concurrency']} | {r['aggregate_tokens_per_s']:.1f} | "
                     f"{ratio:.2f}x | {r['median_ms_per_token']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--methods", default="autoregressive,prompt_lookup,lookahead")
    parser.add_argument("--batching", default="on,off", help="settings to run, in order")
    parser.add_argument("--requests", type=int, default=8, help="requests per level: max(level, this)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=Path, action="append", default=None)
    parser.add_argument("--limit", type=int, default=8, help="distinct prompts, spread over the categories")
    parser.add_argument("--target-model", default="smollm2")
    parser.add_argument("--draft-model", default=None, help="a draft service for draft_model (default: none)")
    parser.add_argument("--engine", default="torch", choices=["auto", "torch", "llama.cpp"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--simulated", action="store_true", help="simulated models instead (GPU-like: a pass costs "
                                                                 "target-ms + token-ms x its tokens)")
    parser.add_argument("--target-ms", type=float, default=20.0)
    parser.add_argument("--token-ms", type=float, default=0.0)
    parser.add_argument("--in-process", action="store_true", help="the scheduler and engine alone (see above)")
    parser.add_argument("--out", type=Path, default=Path("bench-batching"))
    args = parser.parse_args()
    if args.in_process:
        measure_in_process(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = measure(args)
    result["wall_s"] = time.perf_counter() - began
    (args.out / "batching.json").write_text(json.dumps(result, indent=1))
    (args.out / "batching.md").write_text(table(result) + "\n")
    print(table(result))
    print(f"CPU: {cpu_description()}; mismatches: {len(result['mismatches'])}")
    for line in result["mismatches"][:20]:
        print("  " + line)


if __name__ == "__main__":
    main()
