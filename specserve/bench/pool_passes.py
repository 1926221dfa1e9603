"""What the shared n-gram pool adds: the same prompts twice through a Redis pool.

Per method (LOOKAHEAD, PROMPT_LOOKUP), with a fresh Redis each: pass 1 through one
orchestrator, pass 2 through the same orchestrator, pass 2 again through a second
orchestrator (its own process and target, the same Redis). Plain decoding runs last,
on the second stack, for tokens/s ratios. Per step, the orchestration overhead
(wall - compute, which includes the pool's reads) is reported too.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

from specserve.bench.records import RunRecord

METHODS = ("lookahead", "prompt_lookup")
COLUMNS = [("method", "method", 0), ("pass", "pass", 0), ("n", "n", 0), ("tau", "tau", 2), ("tokens_per_s", "tok/s (median)", 1),
           ("vs_first_pass", "vs 1st pass (median)", 2), ("vs_autoregressive", "vs autoregressive (median)", 2),
           ("same_output_as_first_pass", "same output", 2), ("overhead_ms_per_step_p50", "overhead ms/step p50", 2),
           ("overhead_ms_per_step_p99", "p99", 2)]


def measure_pool_passes(args, prompts, log_dir: Path) -> list[dict]:
    from specserve.bench.runners.distributed import DistributedRunner
    from specserve.launcher import Stack, StackConfig

    common = dict(target_model=args.target_model, dtype=args.dtype, port=0, default_method="autoregressive",
                  threads=args.threads, extra_env={"SPECSERVE_LOOKAHEAD": args.lookahead} if args.lookahead else {})
    rows: list[dict] = []
    baseline: dict[str, RunRecord] = {}
    for method in METHODS:
        with Stack(StackConfig(redis="auto", log_dir=log_dir / f"pool-{method}-a", **common)) as first:
            if not first.redis_url:
                return [{"note": "skipped: redis-server is not installed"}]
            passes = {}
            runner = DistributedRunner(first.address)
            passes["1st pass"] = _run(runner, prompts, method, args.max_new_tokens)
            passes["2nd pass, same orchestrator"] = _run(runner, prompts, method, args.max_new_tokens)
            runner.close()
            with Stack(StackConfig(redis=first.redis_url, log_dir=log_dir / f"pool-{method}-b", **common)) as second:
                runner = DistributedRunner(second.address)
                passes["2nd pass, another orchestrator"] = _run(runner, prompts, method, args.max_new_tokens)
                if not baseline:  # plain decoding never reads the pool: once is enough
                    baseline = {r.prompt_id: r for r in _run(runner, prompts, "autoregressive", args.max_new_tokens)}
                runner.close()
        reference = {r.prompt_id: r.token_ids for r in passes["1st pass"]}
        first_rate = {r.prompt_id: r.tokens_per_s for r in passes["1st pass"]}
        for name, records in passes.items():
            rows.append(_row(method, name, records, first_rate, reference, baseline))
    rows.append(_row("autoregressive", "-", list(baseline.values()), None, None, baseline))
    return rows


def _run(runner, prompts, method: str, max_new_tokens: int) -> list[RunRecord]:
    return [runner.run(prompt, method, max_new_tokens, step_timings=True) for prompt in prompts]


def _row(method: str, name: str, records: list[RunRecord], first_rate, reference, baseline) -> dict:
    steps = sum(r.decode_steps or 0 for r in records)
    overhead = [wall - compute for r in records for wall, compute in r.step_timings]
    return {
        "method": method,
        "pass": name,
        "n": len(records),
        "tau": sum(r.generated_tokens for r in records) / steps if steps else None,
        "tokens_per_s": median(r.tokens_per_s for r in records),
        "vs_first_pass": median(r.tokens_per_s / first_rate[r.prompt_id] for r in records) if first_rate else None,
        "vs_autoregressive": median(r.tokens_per_s / baseline[r.prompt_id].tokens_per_s for r in records
                                    if r.prompt_id in baseline),
        "same_output_as_first_pass": (sum(reference[r.prompt_id] == r.token_ids for r in records) / len(records)
                                      if reference else None),
        "overhead_ms_per_step_p50": median(overhead) if overhead else None,
        "overhead_ms_per_step_p99": sorted(overhead)[int(0.99 * (len(overhead) - 1))] if overhead else None,
    }
