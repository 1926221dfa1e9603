"""`specserve bench`: every method side by side on benchmark prompts.

Phases, in one run: (1) the main comparison, each prompt through every (mode, method)
in turn, modes = the served stack ("distributed"), the same loop in this process
("in_process"), and transformers' generate ("hf"); (2) concurrency through the stack;
(3) orchestration overhead on simulated models. Results go to --out after each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from specserve.bench import aggregate, report
from specserve.bench.prompts import balanced_subset, default_prompt_files, load_prompts
from specserve.bench.records import METHODS, MODES, RunRecord

WARMUP_TOKENS = 8


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specserve.runtime.models import DEFAULT_MODEL

    parser.add_argument("--prompts", type=Path, action="append", default=None,
                        help="a JSONL prompt file (repeatable); default: Spec-Bench and HumanEval from ../shared/bench beside the repository")
    parser.add_argument("--limit", type=int, default=None,
                        help="N prompts in total, spread round-robin over the categories (N = #categories: one each)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; autoregressive is always run")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of distributed,in_process,hf")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--target-model", default=DEFAULT_MODEL)
    parser.add_argument("--draft-model", default=None, help="default: the shipped draft (specserve.runtime.models.default_draft_model())")
    parser.add_argument("--redis", default="off", help="the stack's Redis ('off' keeps prompt lookup identical to in-process)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the services and of this process, 0 = torch's default (on a busy machine 1 "
                             "is far faster: 2 threads on 2 shared cores stall in OpenMP barriers)")
    parser.add_argument("--concurrency", default="1,4,16", help="client counts for the concurrency phase; '' skips it")
    parser.add_argument("--concurrency-requests", type=int, default=8, help="requests per level: max(level, this)")
    parser.add_argument("--concurrency-max-new-tokens", type=int, default=64)
    parser.add_argument("--overhead-step-ms", default="0,5,20", help="simulated target step times; '' skips the phase")
    parser.add_argument("--overhead-requests", type=int, default=4)
    parser.add_argument("--overhead-max-new-tokens", type=int, default=128)
    parser.add_argument("--sim-accept", type=float, default=0.8, help="simulated draft's per-proposal acceptance probability")
    parser.add_argument("--sim-draft-ratio", type=float, default=0.1, help="simulated draft step time / target step time")
    parser.add_argument("--lookahead", default="",
                        help="LOOKAHEAD's window,ngram,guesses for the stack and the in-process engine (default: the server's)")
    parser.add_argument("--pool-passes", action="store_true",
                        help="also run LOOKAHEAD and PROMPT_LOOKUP twice over the prompts through a shared Redis pool: the "
                             "second pass in the same orchestrator and in a second one (needs redis-server)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    from specserve.cli import add_tree_flags

    add_tree_flags(parser)  # the stack's and the in-process engine's, alike


def run(args: argparse.Namespace) -> int:
    from specserve.runtime.models import default_draft_model

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    prompts = balanced_subset(load_prompts(args.prompts or default_prompt_files()), args.limit)
    methods = ["autoregressive"] + [m for m in _csv(args.methods) if m != "autoregressive"]
    unknown = set(methods) - set(METHODS) | set(_csv(args.modes)) - set(MODES)
    if unknown:
        raise SystemExit(f"bench: unknown method or mode: {', '.join(sorted(unknown))}")
    draft_model = args.draft_model or default_draft_model()
    if "draft_model" in methods and draft_model is None:
        methods.remove("draft_model")
        notes.append("draft_model skipped: no draft model (none shipped yet; pass --draft-model)")
    meta = _meta(args, prompts, methods, draft_model)
    report.write_json(out / "meta.json", meta)
    notes.append(f"{len(prompts)} prompts in {len({p.category for p in prompts})} categories, max_new_tokens "
                 f"{args.max_new_tokens}, dtype {args.dtype}, greedy; machine: {meta['machine']}")
    state = {"records": [], "concurrency": [], "overhead": []}

    def save() -> None:
        _write_results(out, state, notes, args)

    with contextlib.ExitStack() as resources:
        if args.threads:
            from specserve.bench.overhead import torch_threads

            resources.enter_context(torch_threads(args.threads))
        address = _main_phase(args, prompts, methods, _csv(args.modes), draft_model, out, notes, state, resources, save)
        levels = [int(c) for c in _csv(args.concurrency)]
        if address and levels:
            from specserve.bench.concurrency import measure_concurrency

            total = sum(max(level, args.concurrency_requests) for level in levels) * len(methods)
            with tqdm(total=total, desc="concurrency", unit="req") as progress:
                state["concurrency"] = measure_concurrency(address, prompts, methods, levels, args.concurrency_max_new_tokens,
                                                           args.concurrency_requests, progress)
            save()
    if args.pool_passes:
        from specserve.bench.pool_passes import measure_pool_passes

        state["pool_passes"] = measure_pool_passes(args, prompts, out / "logs")
        report.write_json(out / "pool_passes.json", state["pool_passes"])
    step_times = [float(s) for s in _csv(args.overhead_step_ms)]
    if step_times:
        from specserve.bench.overhead import SimulationConfig, measure_overhead

        config = SimulationConfig(args.sim_accept, args.sim_draft_ratio, args.overhead_max_new_tokens, args.overhead_requests)
        with tqdm(total=len(step_times) * 2 * config.requests, desc="overhead", unit="req") as progress:
            state["overhead"] = measure_overhead(step_times, prompts, config, out / "logs", progress)
        notes.append(f"overhead: simulated draft accepts each proposal with p={config.accept}, draft step = "
                     f"{config.draft_ratio:g} x target step, {config.requests} requests x {config.max_new_tokens} tokens per step time")
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["load_average_end"] = os.getloadavg()
    report.write_json(out / "meta.json", meta)
    save()
    print(f"results in {out}/results.md, results.json, chart.png", file=sys.stderr)
    return 0


def _main_phase(args, prompts, methods, modes, draft_model, out, notes, state, resources, save) -> str:
    """Runs the interleaved comparison; returns the stack's address ('' without one)."""
    from specserve.bench.runners.distributed import DistributedRunner
    from specserve.launcher import Stack, StackConfig
    from specserve.loading import load_model
    from specserve.runtime.models import load_tokenizer

    if not modes:
        return ""
    address = ""
    runners = []
    if "distributed" in modes:
        stack = resources.enter_context(Stack(StackConfig(
            target_model=args.target_model, draft_model=draft_model if "draft_model" in methods else None, dtype=args.dtype,
            port=0, redis=args.redis, default_method="autoregressive", threads=args.threads, log_dir=out / "logs",
            tree_nodes=args.tree_nodes, tree_width=args.tree_width, tree_branch=args.tree_branch,
            extra_env={"SPECSERVE_LOOKAHEAD": args.lookahead} if args.lookahead else {})))
        address = stack.address
        runner = DistributedRunner(address)
        resources.callback(runner.close)
        runners.append(runner)
    if "in_process" in modes or "hf" in modes:
        from specserve.bench.runners.hf import HfRunner
        from specserve.bench.runners.in_process import InProcessRunner

        target = load_model(args.target_model, args.dtype)
        draft = load_model(draft_model, args.dtype) if "draft_model" in methods else None
        tokenizer = load_tokenizer(args.target_model)
        if "in_process" in modes:
            from orchestrator.requests import Limits

            from orchestrator.main import parse_shape

            shape = {"lookahead": parse_shape(args.lookahead)} if args.lookahead else {}
            limits = Limits(tree_nodes=args.tree_nodes, tree_width=args.tree_width, tree_branch=args.tree_branch, **shape)
            runners.append(InProcessRunner(target, draft, tokenizer, limits))
        if "hf" in modes:
            runners.append(HfRunner(target, tokenizer, draft))
    jobs = _warm_up(runners, methods, prompts[0], notes)
    records: list[RunRecord] = state["records"]
    with open(out / "outputs.jsonl", "w", encoding="utf-8") as outputs, \
            tqdm(total=len(prompts) * len(jobs), desc=f"bench {args.dtype}", unit="gen") as progress:
        for i, prompt in enumerate(prompts):
            # Every (mode, method) in turn for each prompt, the order rotated from prompt to prompt.
            for runner, method in jobs[i % len(jobs):] + jobs[:i % len(jobs)]:
                try:
                    record = runner.run(prompt, method, args.max_new_tokens)
                except Exception as error:  # one failed generation must not end the run
                    notes.append(f"{runner.mode}/{method} failed on {prompt.prompt_id}: {error!r}")
                    progress.update(1)
                    continue
                records.append(record)
                outputs.write(json.dumps(record.to_json()) + "\n")
                outputs.flush()
                progress.update(1)
                progress.set_postfix_str(f"{runner.mode}/{method} {record.tokens_per_s:.1f} tok/s")
            if (i + 1) % 4 == 0:
                save()
    save()
    return address


def _warm_up(runners, methods, prompt, notes) -> list:
    """Runs every (runner, method) once, unrecorded; returns the pairs that work."""
    jobs = []
    for runner in runners:
        for method in methods:
            skip_reason = getattr(runner, "skip_reason", None)  # a runner that cannot run some method says why
            reason = skip_reason(method) if skip_reason else None
            if reason:
                notes.append(f"{runner.mode}/{method} skipped: {reason}")
                continue
            try:
                runner.run(prompt, method, WARMUP_TOKENS)
                jobs.append((runner, method))
            except Exception as error:
                notes.append(f"{runner.mode}/{method} skipped: warm-up failed with {error!r}")
    return jobs


def _write_results(out: Path, state: dict, notes: list[str], args) -> None:
    rows = aggregate.summarize(state["records"])
    cost = aggregate.distribution_cost(state["records"])
    report.write_json(out / "results.json", rows)
    report.write_json(out / "distribution_cost.json", cost)
    report.write_json(out / "concurrency.json", state["concurrency"])
    report.write_json(out / "overhead.json", state["overhead"])
    report.write_markdown(out / "results.md", rows, cost, state["overhead"], state["concurrency"], notes)
    if state.get("pool_passes"):
        from specserve.bench.pool_passes import COLUMNS

        with open(out / "results.md", "a", encoding="utf-8") as md:
            md.write("\n## Shared n-gram pool: the same prompts twice through Redis\n\n"
                     + report.markdown_table(state["pool_passes"], COLUMNS) + "\n")
    if rows:
        report.write_chart(out / "chart.png", rows, f"{args.target_model} {args.dtype}, greedy, {args.max_new_tokens} new tokens")


def _meta(args, prompts, methods, draft_model) -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} CPU cores ({cpu}), no GPU, load average at start {os.getloadavg()[0]:.1f}",
        "load_average_start": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "git_commit": commit,
        "target_model": args.target_model,
        "draft_model": draft_model,
        "dtype": args.dtype,
        "methods": methods,
        "modes": args.modes,
        "prompts": [p.prompt_id for p in prompts],
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "tree": {"nodes": args.tree_nodes, "width": args.tree_width, "branch": args.tree_branch},
        "lookahead": args.lookahead or "server default",
    }
