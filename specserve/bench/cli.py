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
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of distributed,distributed_adaptive,in_process,hf,llama_cpp "
                             "(llama.cpp's own decoding: the peer)")
    parser.add_argument("--engine", choices=["auto", "torch", "llama.cpp"], default="auto",
                        help="the engine of the stack's and the in-process target (auto: llama.cpp for a GGUF model on the CPU)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: the dtype whose measured cost profile serves best here (reported in meta.json)")
    parser.add_argument("--target-model", default=DEFAULT_MODEL)
    parser.add_argument("--draft-model", default=None, help="default: the shipped draft (specserve.runtime.models.default_draft_model())")
    parser.add_argument("--redis", default="off", help="the stack's Redis ('off' keeps prompt lookup identical to in-process)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the services and of this process, 0 = torch's default (on a busy machine 1 "
                             "is far faster: 2 threads on 2 shared cores stall in OpenMP barriers)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="client counts for the concurrency phase; '' skips it")
    parser.add_argument("--concurrency-batching", default="on,off",
                        help="the services' continuous batching in the concurrency phase: 'on' measures the main stack, "
                             "'off' a second stack alike but for batching")
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
    parser.add_argument("--exactness", action="store_true",
                        help="run the exactness matrix instead (specserve.bench.exactness): --methods x engines (--engine; "
                             "auto: torch and llama.cpp) x alone/batched/failover x dtypes (--dtype; auto: float32 and "
                             "bfloat16), --limit prompts (default 8), --max-new-tokens; written to OUT/exactness.md")
    from specserve.cli import add_tree_flags

    add_tree_flags(parser)  # the stack's and the in-process engine's, alike


def run(args: argparse.Namespace) -> int:
    from specserve.runtime.models import default_draft_model

    if args.exactness:
        return _exactness(args)

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
    with _threads(args.threads):
        # Resolved here, with the services' thread count, so every mode runs the same dtype.
        dtype_requested, args.dtype, dtype_rates = _resolve_dtype(args)
    meta = _meta(args, prompts, methods, draft_model)
    meta["dtype_requested"], meta["dtype_rates"] = dtype_requested, dtype_rates
    report.write_json(out / "meta.json", meta)
    notes.append(f"{len(prompts)} prompts in {len({p.category for p in prompts})} categories, max_new_tokens "
                 f"{args.max_new_tokens}, dtype {args.dtype}, greedy; machine: {meta['machine']}")
    state = {"records": [], "concurrency": [], "overhead": []}

    def save() -> None:
        _write_results(out, state, notes, args)

    with contextlib.ExitStack() as resources:
        resources.enter_context(_threads(args.threads))
        address = _main_phase(args, prompts, methods, _csv(args.modes), draft_model, out, notes, state, resources, save)
        meta["cost_profiles"] = _profiles_used(args, draft_model if "draft_model" in methods else None)
        report.write_json(out / "meta.json", meta)
        notes.append(_profile_note(meta))
        levels = [int(c) for c in _csv(args.concurrency)]
        if address and levels:
            from specserve.bench.concurrency import measure_concurrency
            from specserve.launcher import Stack

            settings = _csv(args.concurrency_batching)
            total = sum(max(level, args.concurrency_requests) for level in levels) * len(methods) * len(settings)
            with tqdm(total=total, desc="concurrency", unit="req") as progress:
                for batching in settings:
                    with contextlib.ExitStack() as other:
                        where = address
                        if batching == "off":  # a second stack, alike but for batching
                            config = _stack_config(args, draft_model, methods, out / "logs-unbatched", batching="off")
                            where = other.enter_context(Stack(config)).address
                            _warm_up_stack(where, prompts[0])
                        rows = measure_concurrency(where, prompts, methods, levels, args.concurrency_max_new_tokens,
                                                   args.concurrency_requests, progress)
                    state["concurrency"] += [{"batching": batching, **row} for row in rows]
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
    if "distributed" in modes or "distributed_adaptive" in modes:
        stack = resources.enter_context(Stack(_stack_config(args, draft_model, methods, out / "logs")))
        address = stack.address
        if "distributed" in modes:
            runner = DistributedRunner(address)
            resources.callback(runner.close)
            runners.append(runner)
        if "distributed_adaptive" in modes:
            adaptive = DistributedRunner(stack.add_orchestrator("orchestrator-adaptive", ["--speculation-control", "adaptive"]),
                                         mode="distributed_adaptive")
            resources.callback(adaptive.close)
            runners.append(adaptive)
    if "in_process" in modes or "hf" in modes:
        from specserve.bench.runners.hf import HfRunner
        from specserve.bench.runners.in_process import InProcessRunner
        from specserve.loading import resolve_engine

        # transformers' generate needs the PyTorch module: hf mode keeps the torch engine.
        engine = "torch" if "hf" in modes else resolve_engine(args.engine, args.target_model, "cpu", args.dtype)
        target = load_model(args.target_model, _torch_dtype(args, args.target_model, "target"), engine=engine,
                            threads=args.threads)
        draft = load_model(draft_model, _torch_dtype(args, draft_model, "draft")) if "draft_model" in methods else None
        tokenizer = load_tokenizer(args.target_model)
        if "in_process" in modes:
            from specserve.generation.requests import Limits, parse_shape

            shape = {"lookahead": parse_shape(args.lookahead)} if args.lookahead else {}
            limits = Limits(tree_nodes=args.tree_nodes, tree_width=args.tree_width, tree_branch=args.tree_branch, **shape)
            runners.append(InProcessRunner(target, draft, tokenizer, limits))
        if "hf" in modes:
            runners.append(HfRunner(target, tokenizer, draft))
    if "llama_cpp" in modes:
        from specserve.loading import llama_cpp_available
        from specserve.runtime.models import gguf_file

        if not llama_cpp_available():
            notes.append("llama_cpp skipped: llama-cpp-python is not installed (make install builds it)")
        elif gguf_file(args.target_model) is None:
            notes.append(f"llama_cpp skipped: {args.target_model} is not a GGUF model")
        else:
            from specserve.bench.runners.llama_cpp import LlamaCppRunner

            peer = LlamaCppRunner(args.target_model, load_tokenizer(args.target_model), args.threads)
            resources.callback(peer.close)
            runners.append(peer)
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


def _warm_up_stack(address: str, prompt) -> None:
    """One short request, so a new stack's first-session costs (a llama.cpp context) stay out of the figures."""
    from specserve.bench.runners.distributed import DistributedRunner

    runner = DistributedRunner(address)
    try:
        runner.run(prompt, "autoregressive", 4)
    finally:
        runner.close()


def _stack_config(args, draft_model, methods, log_dir: Path, batching: str = "on"):
    from specserve.launcher import StackConfig

    env = {"SPECSERVE_BATCHING": batching}
    if args.lookahead:
        env["SPECSERVE_LOOKAHEAD"] = args.lookahead
    return StackConfig(
        target_model=args.target_model, draft_model=draft_model if "draft_model" in methods else None, dtype=args.dtype,
        port=0, redis=args.redis, default_method="autoregressive", threads=args.threads, engine=args.engine,
        log_dir=log_dir, tree_nodes=args.tree_nodes, tree_width=args.tree_width, tree_branch=args.tree_branch, extra_env=env)


def _threads(threads: int):
    if not threads:
        return contextlib.nullcontext()
    from specserve.bench.overhead import torch_threads

    return torch_threads(threads)


def _resolve_dtype(args) -> tuple[str, str, dict[str, float]]:
    """(requested, chosen, each candidate's expected tokens/ms when measured)."""
    from specserve.loading import resolve_engine

    if args.dtype != "auto" or resolve_engine(args.engine, args.target_model, "cpu", "auto") != "torch":
        return args.dtype, args.dtype, {}  # llama.cpp computes in the GGUF's own types: dtype stays auto
    from specserve.dtype_choice import choose_dtype

    chosen, rates = choose_dtype(args.target_model, "target")
    return "auto", chosen, rates


def _exactness(args) -> int:
    from specserve.bench import exactness

    methods = [m for m in _csv(args.methods) if m in exactness.METHODS]
    matrix = argparse.Namespace(
        engines="torch,llama.cpp" if args.engine == "auto" else args.engine,
        dtypes="float32,bfloat16" if args.dtype == "auto" else args.dtype,
        methods=",".join(["autoregressive"] + [m for m in methods if m != "autoregressive"]),
        modes=",".join(exactness.MODES), prompts=args.limit or 8, max_new_tokens=args.max_new_tokens,
        concurrency=16, out=args.out)
    cells = exactness.run(matrix)
    return 0 if all(c.exact for c in cells if c.engine == "torch" and c.dtype == "float32") else 1


def _torch_dtype(args, model: str, role: str) -> str:
    """The dtype a PyTorch-run model loads in: the one asked for, or measured when that is auto."""
    from specserve.dtype_choice import resolve_dtype

    return resolve_dtype(args.dtype, model, role)


def _profiles_used(args, draft_model: str | None) -> dict:
    """The cost profiles the services use (read from the cache they wrote, same thread count)."""
    from specserve.loading import load_model
    from specserve.runtime.profile import profile_for, profile_to_json

    profiles = {}
    with _threads(args.threads):
        for role, model in (("target", args.target_model), ("draft", draft_model)):
            measured = profile_for(load_model(model, _torch_dtype(args, model, role)), role) if model else None
            if measured is not None:
                profiles[role] = {**profile_to_json(measured), "from_cache": measured.from_cache}
    return profiles


def _profile_note(meta: dict) -> str:
    target = meta.get("cost_profiles", {}).get("target")
    if not target:
        return "no cost profile (simulated models)"
    ms = {(p["context_tokens"], p["new_tokens"]): p["ms"] for p in target["verify_chain"]}
    context = min(c for c, _ in ms)
    shape = ", ".join(f"k={k} {ms[(context, k)]:.1f}" for k in (1, 4, 16, 64) if (context, k) in ms)
    rates = ", ".join(f"{d} {r * 1e3:.1f}" for d, r in meta.get("dtype_rates", {}).items())
    return (f"dtype {meta['dtype']} (requested {meta['dtype_requested']}{'; expected tok/s ' + rates if rates else ''}); "
            f"CPU flags {' '.join(target['machine']['flags'])}; target verify ms at context {context}: {shape}; "
            f"memory {target['memory_gb_s']:.1f} GB/s, matmul {target['matmul_gflop_s']:.0f} GFLOP/s")


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

    from specserve.runtime.profile import machine_facts

    machine = machine_facts()
    cpu = f"{machine['cpu']}; {' '.join(machine['flags'])}"
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
        "cpu": machine["cpu"],
        "cpu_flags": machine["flags"],
        "methods": methods,
        "modes": args.modes,
        "prompts": [p.prompt_id for p in prompts],
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "engine": args.engine,
        "tree": {"nodes": args.tree_nodes, "width": args.tree_width, "branch": args.tree_branch},
        "lookahead": args.lookahead or "server default",
    }
