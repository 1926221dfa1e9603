"""Aggregate throughput with N clients at once, through the served stack.

At concurrency c, c client threads share one channel and pull requests from a queue
of max(c, min_requests) prompts (cycled); aggregate tokens/s = all generated tokens /
the batch's wall time. With continuous batching on (the services' default), concurrent
sessions' rows share the target's and the draft's forward passes; with it off they take turns.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from specserve.bench.aggregate import median
from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import BASELINE_METHOD, RunRecord
from specserve.bench.runners.distributed import DistributedRunner


def run_batch(runner: DistributedRunner, prompts: list[BenchPrompt], method: str, concurrency: int,
              max_new_tokens: int) -> tuple[list[RunRecord], float]:
    """(records, wall seconds of the whole batch) with `concurrency` requests in flight."""
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-client") as pool:
        records = list(pool.map(lambda prompt: runner.run(prompt, method, max_new_tokens), prompts))
    return records, time.perf_counter() - began


def measure_concurrency(address: str, prompts: list[BenchPrompt], methods: list[str], levels: list[int],
                        max_new_tokens: int, min_requests: int, progress=None) -> list[dict]:
    """One row per (concurrency, method); methods interleaved at each level."""
    runner = DistributedRunner(address)
    rows = []
    try:
        for level in levels:
            batch = [prompts[i % len(prompts)] for i in range(max(level, min_requests))]
            for method in methods:
                records, wall_s = run_batch(runner, batch, method, level, max_new_tokens)
                generated = sum(r.generated_tokens for r in records)
                rows.append({
                    "concurrency": level,
                    "method": method,
                    "requests": len(records),
                    "generated_tokens": generated,
                    "wall_s": wall_s,
                    "aggregate_tokens_per_s": generated / wall_s,
                    "median_request_latency_s": median(r.wall_s for r in records),
                    "median_request_tokens_per_s": median(r.tokens_per_s for r in records),
                })
                if progress is not None:
                    progress.update(len(records))
    finally:
        runner.close()
    baseline = {row["concurrency"]: row["aggregate_tokens_per_s"] for row in rows if row["method"] == BASELINE_METHOD}
    for row in rows:
        row["speedup"] = row["aggregate_tokens_per_s"] / baseline[row["concurrency"]] if baseline.get(row["concurrency"]) else None
    return rows
