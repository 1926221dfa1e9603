"""Orchestration overhead per speculation step, on simulated models of fixed step time.

For each target step time S (e.g. 0, 5, 20 ms) the target sleeps S per forward pass
and the draft S * draft_ratio; the draft's proposals are accepted at a set rate.
DRAFT_MODEL requests run (a) through the full gRPC path (orchestrator -> services,
step timings from GenerationStats.step_timings) and (b) in this process with the same
core loop (no gRPC), so the difference separates gRPC cost from loop cost.
Overhead of a step = its wall time - the time the models computed in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.bench.aggregate import step_overhead
from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import RunRecord
from specserve.bench.runners.distributed import DistributedRunner
from specserve.bench.runners.in_process import InProcessRunner
from specserve.launcher import Stack, StackConfig
from specserve.loading import load_model
from specserve.runtime.models import load_tokenizer

SIM_TOKENIZER = "smollm2"  # the simulated vocabulary is SmolLM2's


@dataclass(frozen=True)
class SimulationConfig:
    accept: float = 0.8  # per-proposal acceptance probability of the simulated draft
    draft_ratio: float = 0.1  # draft step time / target step time
    max_new_tokens: int = 128
    requests: int = 4


def sim_specs(step_ms: float, config: SimulationConfig) -> tuple[str, str]:
    """(target spec, draft spec) for load_model / the services' --model."""
    return (f"sim:role=target,step_ms={step_ms:g}",
            f"sim:role=draft,step_ms={step_ms * config.draft_ratio:g},accept={config.accept:g}")


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def overhead_row(step_ms: float, mode: str, records: list[RunRecord]) -> dict:
    timings = [t for r in records for t in r.step_timings]
    generated = sum(r.generated_tokens for r in records)
    steps = sum(r.decode_steps or 0 for r in records)
    step_wall_s = sum(w for w, _ in timings) / 1e3
    return {
        "step_ms": step_ms,
        "mode": mode,
        "requests": len(records),
        "tau": generated / steps if steps else None,
        **step_overhead(timings),
        # Time per step spent outside propose+verify (prefill, detokenizing, streaming, client).
        "outside_steps_ms_per_step": (sum(r.wall_s for r in records) - step_wall_s) * 1e3 / steps if steps else None,
        "tokens_per_s": generated / sum(r.wall_s for r in records),
    }


def measure_overhead(step_times_ms: list[float], prompts: list[BenchPrompt], config: SimulationConfig,
                     log_dir: Path | None, progress=None) -> list[dict]:
    """Rows (one per step time and mode) of per-step overhead statistics."""
    rows = []
    tokenizer = load_tokenizer(SIM_TOKENIZER)
    chosen = [prompts[i % len(prompts)] for i in range(config.requests)]
    for step_ms in step_times_ms:
        target_spec, draft_spec = sim_specs(step_ms, config)
        # The services host simulated models; the orchestrator tokenizes with SmolLM2's tokenizer.
        stack_config = StackConfig(target_model=target_spec, draft_model=draft_spec, tokenizer=SIM_TOKENIZER, dtype="float32",
                                   port=0, redis="off", default_method="draft_model", threads=1, log_dir=log_dir)
        with Stack(stack_config) as stack, torch_threads(1):
            distributed = DistributedRunner(stack.address)
            in_process = InProcessRunner(load_model(target_spec), load_model(draft_spec), tokenizer)
            by_mode: dict[str, list[RunRecord]] = {"distributed": [], "in_process": []}
            try:
                for runner in (distributed, in_process):  # warm-up, not recorded
                    runner.run(chosen[0], "draft_model", 16, step_timings=True)
                for prompt in chosen:  # interleaved
                    for runner in (distributed, in_process):
                        by_mode[runner.mode].append(runner.run(prompt, "draft_model", config.max_new_tokens, step_timings=True))
                        if progress is not None:
                            progress.update(1)
            finally:
                distributed.close()
        rows.extend(overhead_row(step_ms, mode, records) for mode, records in by_mode.items())
    return rows
