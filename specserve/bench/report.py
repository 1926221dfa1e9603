"""Writing results: results.json (rows), results.md (tables), chart.png (speedup and tau)."""

from __future__ import annotations

import json
from pathlib import Path

from specserve.bench.aggregate import ALL
from specserve.bench.records import BASELINE_METHOD


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """columns: (key, header, digits)."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(key), digits) for key, _, digits in columns) + " |" for row in rows]
    return "\n".join(lines)


MAIN_COLUMNS = [("mode", "mode", 0), ("method", "method", 0), ("category", "category", 0), ("n", "n", 0),
                ("tokens_per_s", "tok/s (median)", 1), ("speedup", "speedup (median)", 2),
                ("speedup_geomean", "speedup (geomean)", 2), ("vs_llama_cpp", "tok/s vs llama.cpp", 2), ("tau", "tau", 2), ("acceptance_rate", "accept rate", 2),
                ("exact_match_rate", "exact match", 2), ("mean_generated_tokens", "mean tokens", 1)]
COST_COLUMNS = [("method", "method", 0), ("n", "n", 0), ("distributed_tokens_per_s", "distributed tok/s", 1),
                ("in_process_tokens_per_s", "in-process tok/s", 1), ("throughput_ratio", "distributed / in-process", 2),
                ("extra_ms_per_token", "extra ms per token", 2), ("same_output_rate", "same output", 2)]
OVERHEAD_COLUMNS = [("step_ms", "target step ms", 0), ("mode", "mode", 0), ("steps", "steps", 0), ("tau", "tau", 2),
                    ("step_wall_ms_p50", "step wall p50 ms", 2), ("step_compute_ms_p50", "step compute p50 ms", 2),
                    ("overhead_ms_p50", "overhead p50 ms", 3), ("overhead_ms_p99", "overhead p99 ms", 3),
                    ("overhead_fraction_p50", "overhead / step (p50)", 3),
                    ("outside_steps_ms_per_step", "outside-step ms per step", 2), ("tokens_per_s", "tok/s", 1)]
CONCURRENCY_COLUMNS = [("batching", "batching", 0), ("concurrency", "clients", 0), ("method", "method", 0), ("requests", "requests", 0),
                       ("aggregate_tokens_per_s", "aggregate tok/s", 1), ("speedup", "speedup vs autoregressive", 2),
                       ("median_request_latency_s", "median latency s", 2), ("median_request_tokens_per_s", "per-request tok/s", 1)]


def write_markdown(path: Path, rows: list[dict], cost: list[dict], overhead: list[dict], concurrency: list[dict],
                   notes: list[str]) -> None:
    overall = [r for r in rows if r["category"] == ALL]
    parts = ["# Benchmark results", ""]
    parts += [f"- {note}" for note in notes] + [""]
    parts += ["## All categories", "", markdown_table(overall, MAIN_COLUMNS), ""]
    if cost:
        parts += ["## Cost of distribution (same prompts, same weights, gRPC vs one process)", "",
                  markdown_table(cost, COST_COLUMNS), ""]
    if overhead:
        parts += ["## Orchestration overhead per speculation step (simulated models, DRAFT_MODEL)", "",
                  markdown_table(overhead, OVERHEAD_COLUMNS), ""]
    if concurrency:
        parts += ["## Concurrency (distributed stack)", "", markdown_table(concurrency, CONCURRENCY_COLUMNS), ""]
    parts += ["## Per category", "", markdown_table([r for r in rows if r["category"] != ALL], MAIN_COLUMNS), ""]
    path.write_text("\n".join(parts), encoding="utf-8")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def write_chart(path: Path, rows: list[dict], title: str) -> None:
    """Two panels, speedup (median) and tau, grouped by category; one bar per mode/method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["method"] != BASELINE_METHOD]
    series = sorted({(r["mode"], r["method"]) for r in shown})
    categories = [ALL] + sorted({r["category"] for r in shown} - {ALL})
    if not series:
        return
    index = {(r["mode"], r["method"], r["category"]): r for r in shown}
    width = 0.8 / len(series)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(categories) + 2), 7.5), sharex=True)
    for axis, key, label in ((axes[0], "speedup", "speedup over autoregressive (median)"), (axes[1], "tau", "tau (tokens per target step)")):
        for s, (mode, method) in enumerate(series):
            values = [(index.get((mode, method, c)) or {}).get(key) or 0.0 for c in categories]
            positions = [i + (s - (len(series) - 1) / 2) * width for i in range(len(categories))]
            axis.bar(positions, values, width, label=f"{method} ({mode})")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, ncol=min(3, len(series)))
    axes[1].set_xticks(range(len(categories)))
    axes[1].set_xticklabels(categories, rotation=40, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
