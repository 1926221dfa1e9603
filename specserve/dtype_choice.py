"""`--dtype auto`: the dtype whose measured cost profile serves best on this machine.

Flags alone do not say it: a CPU with bf16 matrix units (AMX) verifies 64 bf16 tokens
for little more than one, while one with only AVX-512/AVX2 runs bf16 matrix-vector
products fast and matrix-matrix products slowly. So each candidate dtype is profiled
(runtime.profile, cached per machine) and scored by the tokens per millisecond the
controller expects at a typical acceptance; float32 wins unless bfloat16 beats it
clearly, since float32 output is exactly plain decoding's.
"""

from __future__ import annotations

from specserve.core.controller import PLAIN, ControllerConfig, CostProfile, SpeculationController

CANDIDATES = ("float32", "bfloat16")
REFERENCE_ACCEPTANCE = 0.6  # per position: a typical draft on chat text
REFERENCE_CONTEXT = 512
MARGIN = 1.05  # bfloat16 must serve this much faster to give up float32's exactness


def serving_rate(costs: CostProfile, role: str) -> float:
    """Tokens per ms a request can expect (target), or drafting steps per ms (draft)."""
    if role != "target":
        return 1.0 / max(costs.draft_step.ms(1, REFERENCE_CONTEXT), 1e-6) if costs.draft_step else 0.0
    config = ControllerConfig(prior=REFERENCE_ACCEPTANCE, prior_weight=1e9)
    controller = SpeculationController(costs, None, config)
    return max(controller.rate(plan, REFERENCE_CONTEXT) for plan in [PLAIN, *controller.candidates(1000)])


def choose_dtype(model: str, role: str = "target", device: str = "cpu") -> tuple[str, dict[str, float]]:
    """(the chosen dtype, each candidate's serving rate)."""
    from specserve.loading import load_model
    from specserve.runtime.profile import profile_for

    rates = {}
    for dtype in CANDIDATES:
        measured = profile_for(load_model(model, dtype, device), role, device)
        if measured is None:  # a simulated model: nothing to measure
            return "float32", {}
        rates[dtype] = serving_rate(measured.costs, role)
    return pick(rates), rates


def pick(rates: dict[str, float]) -> str:
    """bfloat16 when it serves MARGIN faster than float32, else float32."""
    return "bfloat16" if rates.get("bfloat16", 0.0) > MARGIN * rates.get("float32", 0.0) else "float32"


def resolve_dtype(dtype: str, model: str, role: str = "target", device: str = "cpu") -> str:
    """dtype itself, or for "auto" the measured choice (logged)."""
    if dtype != "auto":
        return dtype
    import logging

    chosen, rates = choose_dtype(model, role, device)
    logging.getLogger(__name__).info("dtype auto -> %s (expected tokens/ms: %s)", chosen,
                                     ", ".join(f"{d} {r:.4f}" for d, r in rates.items()))
    return chosen
