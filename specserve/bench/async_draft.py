"""Asynchronous drafting, measured: DRAFT_MODEL requests drafting synchronously (draft, then
verify) and asynchronously (the draft drafts the next step while the target verifies), through
the served stack, interleaved request by request on the same services.

    python -m specserve.bench.async_draft --simulated            # GPU-like simulated models (see below)
    python -m specserve.bench.async_draft --dtype float32        # SmolLM2 with the shipped token draft

--simulated runs every combination of --target-ms (5, 20), --draft-ratio (0.2, 0.3, 0.5) and
--accept (0.6, 0.8): the target sleeps target-ms per forward pass, the draft target-ms x ratio,
and the draft's proposals are right with probability accept (specserve/bench/simulated.py).
The services are separate processes whose model threads sleep (releasing the GIL), so their
work really overlaps, as on separate accelerators; their costs do not grow with a pass's rows.

Per setting and mode (off: synchronous; on: asynchronous every step; auto: where expected
faster): tokens/s (generated tokens over the requests' wall time), tau, the share of the
draft's compute hidden behind verification, the share of verdicts a drafted outcome matched,
and the orchestration overhead per step (wall - the compute on the critical path:
GenerationStats.step_timings). The last line printed is one JSON object: the headline
setting's synchronous and asynchronous tokens/s and their ratio (simulated: target 20 ms,
draft 0.3x, acceptance 0.8), with every setting's rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

from specserve.bench.aggregate import percentile
from specserve.bench.prompts import BenchPrompt, balanced_subset, default_prompt_files, load_prompts
from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig

MODES = ("off", "on", "auto")
HEADLINE = (20.0, 0.3, 0.8)  # simulated: target ms, draft ratio, acceptance
SIM_PROMPTS = [BenchPrompt(f"sim:{i}", "sim", text) for i, text in enumerate(
    ["Tell me a story.", "List the planets.", "Explain speculative decoding.", "Write a poem about rain."])]


def run_setting(config: StackConfig, prompts: list[BenchPrompt], args) -> dict[str, dict]:
    """Per mode: the figures of every prompt's request, interleaved mode by mode."""
    records: dict[str, list] = {mode: [] for mode in args.modes}
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        with channel:
            for mode in args.modes:  # warm-up: first-call costs stay out of the figures
                generate(stub, _request(prompts[0], mode, 16), timeout_s=600)
            for prompt, mode in itertools.product(prompts, args.modes):
                began = time.perf_counter()
                result = generate(stub, _request(prompt, mode, args.max_new_tokens), timeout_s=1800)
                records[mode].append((time.perf_counter() - began, result))
    return {mode: summarize(rows) for mode, rows in records.items()}


def _request(prompt: BenchPrompt, mode: str, max_new_tokens: int):
    request = build_request(messages=prompt.messages(), method="draft_model", max_new_tokens=max_new_tokens,
                            async_draft=mode)
    request.include_step_timings = True
    return request


def summarize(rows: list) -> dict:
    generated = sum(r.stats.generated_tokens for _, r in rows)
    steps = sum(r.stats.target_forward_passes - 1 for _, r in rows)
    timings = [(s.wall_ms, s.compute_ms) for _, r in rows for s in r.stats.step_timings]
    overheads = [wall - compute for wall, compute in timings]
    draft_ms = sum(r.stats.draft_compute_ms for _, r in rows)
    pipelined = sum(r.stats.pipelined_steps for _, r in rows)
    return {
        "requests": len(rows),
        "tokens_per_s": generated / sum(wall for wall, _ in rows),
        "tau": generated / steps if steps else None,
        "steps": steps,
        "pipelined_steps": pipelined,
        "hit_rate": sum(r.stats.outcome_hits for _, r in rows) / pipelined if pipelined else None,
        "outcomes_per_step": sum(r.stats.outcomes_drafted for _, r in rows) / pipelined if pipelined else None,
        "hidden_share": 1 - sum(r.stats.draft_exposed_ms for _, r in rows) / draft_ms if draft_ms else None,
        "stale_outcomes": sum(r.stats.stale_outcomes for _, r in rows),
        "step_wall_ms_p50": percentile([w for w, _ in timings], 50),
        "overhead_ms_p50": percentile(overheads, 50),
        "overhead_ms_p99": percentile(overheads, 99),
        "synchronous_reason": next((r.stats.synchronous_reason for _, r in rows if r.stats.synchronous_reason), ""),
        "outputs": [list(r.token_ids) for _, r in rows],
    }


def settings(args) -> list[tuple[dict, StackConfig]]:
    log_dir = args.out / "logs"
    if not args.simulated:
        config = StackConfig(target_model=args.target_model, draft_model=args.draft_model, dtype=args.dtype,
                             engine=args.engine, port=0, redis="off", default_method="draft_model", threads=args.threads,
                             log_dir=log_dir)
        return [({"target": args.target_model, "draft": args.draft_model, "dtype": args.dtype}, config)]
    found = []
    for target_ms, ratio, accept in itertools.product(args.target_ms, args.draft_ratio, args.accept):
        config = StackConfig(target_model=f"sim:role=target,step_ms={target_ms:g}",
                             draft_model=f"sim:role=draft,step_ms={target_ms * ratio:g},accept={accept:g}",
                             tokenizer="smollm2", dtype="float32", port=0, redis="off", default_method="draft_model",
                             threads=1, log_dir=log_dir)
        found.append(({"target_ms": target_ms, "draft_ratio": ratio, "accept": accept}, config))
    return found


def table(rows: list[dict]) -> str:
    lines = ["| setting | mode | tokens/s | vs off | tau | draft hidden | outcome hits | overhead ms/step p50 / p99 | step ms p50 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        setting = ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                            for name, value in row["setting"].items())
        base = row["modes"]["off"]["tokens_per_s"]
        for mode, m in row["modes"].items():
            lines.append(f"| {setting} | {mode} | {m['tokens_per_s']:.1f} | {m['tokens_per_s'] / base:.2f}x | {m['tau']:.2f} | "
                         f"{_share(m['hidden_share'])} | {_share(m['hit_rate'])} | {m['overhead_ms_p50']:.2f} / "
                         f"{m['overhead_ms_p99']:.2f} | {m['step_wall_ms_p50']:.1f} |")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def main() -> None:
    from specserve.runtime.models import SHIPPED_DRAFT
    from specserve.runtime.profile import machine_facts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulated", action="store_true", help="GPU-like simulated models (see above)")
    parser.add_argument("--target-ms", type=lambda s: [float(x) for x in s.split(",")], default=[5.0, 20.0])
    parser.add_argument("--draft-ratio", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.3, 0.5])
    parser.add_argument("--accept", type=lambda s: [float(x) for x in s.split(",")], default=[0.6, 0.8])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=Path, action="append", default=None)
    parser.add_argument("--limit", type=int, default=4, help="prompts (real models: spread over the categories)")
    parser.add_argument("--target-model", default="smollm2")
    parser.add_argument("--draft-model", default=str(SHIPPED_DRAFT), help="a token draft (default: the shipped one)")
    parser.add_argument("--engine", default="torch", choices=["auto", "torch", "llama.cpp"])
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-async-draft"))
    args = parser.parse_args()
    if "off" not in args.modes:
        parser.error("--modes must include off (the synchronous baseline)")
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = SIM_PROMPTS[:args.limit] if args.simulated and not args.prompts else balanced_subset(
        load_prompts(args.prompts or default_prompt_files()), args.limit)
    began = time.perf_counter()
    rows = []
    for setting, config in settings(args):
        modes = run_setting(config, prompts, args)
        rows.append({"setting": setting, "modes": modes,
                     "same_output": all(m["outputs"] == modes["off"]["outputs"] for m in modes.values())})
        print("\n".join(table(rows[-1:]).splitlines()[2:]), flush=True)  # progress: this setting's rows
    machine = {**machine_facts(), "load_average": os.getloadavg()}
    (args.out / "async_draft.json").write_text(json.dumps({"rows": rows, "machine": machine, "args": vars(args)}, indent=1,
                                                          default=str))
    print(table(rows))
    print(f"CPU: {machine['cpu']}; load average {machine['load_average']}; {time.perf_counter() - began:.0f} s; "
          f"outputs identical across modes: {all(r['same_output'] for r in rows)}")
    print(json.dumps(headline(rows, args.simulated)))


def headline(rows: list[dict], simulated: bool) -> dict:
    """The headline setting's figures, then every setting's in short."""
    def is_headline(row: dict) -> bool:
        s = row["setting"]
        return not simulated or (s["target_ms"], s["draft_ratio"], s["accept"]) == HEADLINE

    chosen = next((r for r in rows if is_headline(r)), rows[0])
    off, on = chosen["modes"]["off"], chosen["modes"].get("on", {})

    def short(m: dict) -> dict:
        return {k: m[k] for k in ("tokens_per_s", "tau", "hidden_share", "hit_rate", "overhead_ms_p50")}
    return {
        "setting": chosen["setting"],
        "sync_tokens_per_s": off["tokens_per_s"],
        "async_tokens_per_s": on.get("tokens_per_s"),
        "ratio": on["tokens_per_s"] / off["tokens_per_s"] if on else None,
        "draft_hidden_share": on.get("hidden_share"),
        "outcome_hit_rate": on.get("hit_rate"),
        "overhead_ms_p50": {mode: m["overhead_ms_p50"] for mode, m in chosen["modes"].items()},
        "same_output": all(r["same_output"] for r in rows),
        "settings": [{"setting": r["setting"], **{mode: short(m) for mode, m in r["modes"].items()}} for r in rows],
    }


if __name__ == "__main__":
    main()
