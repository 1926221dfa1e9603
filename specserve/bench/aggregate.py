"""From RunRecords to table rows. Pure functions: no I/O, no models.

Definitions (per mode, method and category, plus an "all" category):
- tokens_per_s: median over prompts of generated tokens / wall time;
- speedup: per prompt, this run's tokens per second / the same mode's AUTOREGRESSIVE run's
  (a ratio of rates: outputs that end at different lengths, as in bf16, compare fairly);
  `speedup` is the median of those ratios, `speedup_geomean` their geometric mean;
- vs_llama_cpp: median over prompts of this run's tokens/s / llama.cpp's own plain
  decoding's on the same prompt (the "llama_cpp" peer mode), when it ran;
- tau: total generated tokens / total decoding target forward passes (prefill excluded);
- acceptance_rate: total accepted / total proposed (None when nothing was proposed
  or the method does not report it);
- exact_match_rate: fraction of prompts whose token ids equal the distributed
  AUTOREGRESSIVE run's (the in-process one's when there is no distributed run).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

from specserve.bench.records import BASELINE_METHOD, MODES, METHODS, PEER, RunRecord

ALL = "all"


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def geometric_mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def exact_match_rate(outputs: dict[str, list[int]], references: dict[str, list[int]]) -> float | None:
    """Fraction of the prompts (keys) present in both whose token ids are identical."""
    common = [key for key in outputs if key in references]
    return sum(outputs[key] == references[key] for key in common) / len(common) if common else None


def reference_outputs(records: list[RunRecord]) -> dict[str, list[int]]:
    """prompt_id -> the greedy output of our AUTOREGRESSIVE, distributed first, else in process."""
    references: dict[str, list[int]] = {}
    for mode in ("in_process", "distributed"):  # the later wins
        for record in records:
            if record.mode == mode and record.method == BASELINE_METHOD:
                references[record.prompt_id] = record.token_ids
    return references


def summarize(records: list[RunRecord]) -> list[dict]:
    """Rows per (mode, method, category) and per (mode, method, "all"), in a stable order."""
    references = reference_outputs(records)
    baseline_rate = {(r.mode, r.prompt_id): r.tokens_per_s for r in records if r.method == BASELINE_METHOD}
    peer_rate = {r.prompt_id: r.tokens_per_s for r in records if (r.mode, r.method) == PEER}
    groups: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
    for record in records:
        groups[(record.mode, record.method, record.category)].append(record)
        groups[(record.mode, record.method, ALL)].append(record)
    order = {name: i for i, name in enumerate(MODES + METHODS)}
    rows = []
    for (mode, method, category), group in sorted(
        groups.items(), key=lambda item: (order.get(item[0][0], 99), order.get(item[0][1], 99), item[0][2] != ALL, item[0][2])
    ):
        rows.append(summarize_group(mode, method, category, group, baseline_rate, references, peer_rate))
    return rows


def summarize_group(mode: str, method: str, category: str, group: list[RunRecord],
                    baseline_rate: dict[tuple[str, str], float], references: dict[str, list[int]],
                    peer_rate: dict[str, float] | None = None) -> dict:
    peer_rate = peer_rate or {}
    # Tokens per second over the peer's on the same prompt (outputs may differ in length).
    vs_peer = [r.tokens_per_s / peer_rate[r.prompt_id] for r in group if peer_rate.get(r.prompt_id)]
    speedups = [r.tokens_per_s / baseline_rate[(r.mode, r.prompt_id)] for r in group if baseline_rate.get((r.mode, r.prompt_id))]
    generated = sum(r.generated_tokens for r in group)
    steps = [r.decode_steps for r in group]
    proposed = [r.proposed for r in group]
    accepted = [r.accepted for r in group]
    return {
        "mode": mode,
        "method": method,
        "category": category,
        "n": len(group),
        "tokens_per_s": median(r.tokens_per_s for r in group),
        "speedup": median(speedups),
        "speedup_geomean": geometric_mean(speedups),
        "vs_llama_cpp": median(vs_peer),
        "tau": ratio(generated, sum(steps)) if None not in steps else None,
        "acceptance_rate": ratio(sum(accepted), sum(proposed)) if None not in proposed and None not in accepted else None,
        "exact_match_rate": exact_match_rate({r.prompt_id: r.token_ids for r in group}, references),
        "mean_generated_tokens": generated / len(group),
    }


def distribution_cost(records: list[RunRecord]) -> list[dict]:
    """Per method: distributed vs in-process throughput on the same prompts.

    `throughput_ratio` is the median over prompts of distributed tokens/s / in-process tokens/s
    (1.0: gRPC costs nothing; 0.8: the distributed run is 20% slower).
    """
    walls: dict[tuple[str, str], dict[str, RunRecord]] = defaultdict(dict)
    for record in records:
        walls[(record.method, record.prompt_id)][record.mode] = record
    rows = []
    for method in METHODS:
        pairs = [(by_mode["distributed"], by_mode["in_process"]) for (m, _), by_mode in walls.items()
                 if m == method and "distributed" in by_mode and "in_process" in by_mode]
        if not pairs:
            continue
        rows.append({
            "method": method,
            "n": len(pairs),
            "distributed_tokens_per_s": median(d.tokens_per_s for d, _ in pairs),
            "in_process_tokens_per_s": median(i.tokens_per_s for _, i in pairs),
            "throughput_ratio": median(d.tokens_per_s / i.tokens_per_s for d, i in pairs if i.tokens_per_s > 0),
            "extra_ms_per_token": median((d.wall_s - i.wall_s) * 1e3 / max(d.generated_tokens, 1) for d, i in pairs),
            "same_output_rate": sum(d.token_ids == i.token_ids for d, i in pairs) / len(pairs),
        })
    return rows


def step_overhead(step_timings: list[tuple[float, float]]) -> dict:
    """Orchestration overhead per speculation step from (wall_ms, compute_ms) records."""
    overheads = [wall - compute for wall, compute in step_timings]
    fractions = [(wall - compute) / wall for wall, compute in step_timings if wall > 0]
    return {
        "steps": len(step_timings),
        "step_wall_ms_p50": percentile([w for w, _ in step_timings], 50),
        "step_compute_ms_p50": percentile([c for _, c in step_timings], 50),
        "overhead_ms_p50": percentile(overheads, 50),
        "overhead_ms_p99": percentile(overheads, 99),
        "overhead_fraction_p50": percentile(fractions, 50),
    }
