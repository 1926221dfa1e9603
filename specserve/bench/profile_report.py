"""`specserve profile`: what a forward pass costs on this machine, and how far from its limits.

For the target (and the draft, when given) in each dtype asked for: the cached or freshly
measured cost profile (runtime.profile), one row per shape with its median ms, the least
time its bytes need at the measured memory bandwidth and its FLOPs at the measured matmul
peak, and how many times slower than that floor it runs. Then the dtype `--dtype auto`
would choose and why.
"""

from __future__ import annotations

import argparse

from specserve.runtime.profile import TABLES, MeasuredProfile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specserve.runtime.models import DEFAULT_MODEL, default_draft_model

    parser.add_argument("--target-model", default=DEFAULT_MODEL)
    parser.add_argument("--draft-model", default=default_draft_model(), help="'' to profile the target only")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, 0 = torch's default (profiles are per thread count)")
    parser.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")


def rows(profile: MeasuredProfile) -> list[dict]:
    out = []
    for table_name in TABLES:
        table = getattr(profile.costs, table_name)
        for p in table.points if table is not None else ():
            memory_ms = p.bytes_read / (profile.memory_gb_s * 1e9) * 1e3 if profile.memory_gb_s else 0.0
            compute_ms = p.flops / (profile.matmul_gflop_s * 1e9) * 1e3 if profile.matmul_gflop_s else 0.0
            floor = max(memory_ms, compute_ms)
            out.append({"shape": table_name, "context": p.context_tokens, "tokens": p.new_tokens, "ms": p.ms,
                        "memory_ms": memory_ms, "compute_ms": compute_ms, "x_floor": p.ms / floor if floor else None,
                        "bound": "memory" if memory_ms >= compute_ms else "compute"})
    return out


def format_profile(title: str, profile: MeasuredProfile) -> str:
    m = profile.machine
    source = "cached" if profile.from_cache else "measured now"
    lines = [f"## {title}", "",
             f"{m['cpu']} ({' '.join(m['flags'])}), {m['threads']} threads, torch {m['torch']}; {source}, "
             f"measuring took {profile.measured_s:.1f} s; memory read {profile.memory_gb_s:.1f} GB/s, "
             f"matmul {profile.matmul_gflop_s:.0f} GFLOP/s ({m['dtype']})", "",
             "| shape | context | new tokens | ms | x one token | memory floor ms | compute floor ms | x above floor |",
             "|---|---|---|---|---|---|---|---|"]
    # "x one token": against a forward over one token at the same context (a chain's, a draft step's).
    single = profile.costs.verify_chain or profile.costs.draft_step
    for row in rows(profile):
        one = single.ms(1, row["context"]) if single is not None else row["ms"]
        x = f"{row['x_floor']:.1f} ({row['bound']})" if row["x_floor"] else "–"
        lines.append(f"| {row['shape']} | {row['context']} | {row['tokens']} | {row['ms']:.1f} | {row['ms'] / one:.2f} | "
                     f"{row['memory_ms']:.2f} | {row['compute_ms']:.2f} | {x} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from specserve.dtype_choice import pick, serving_rate
    from specserve.loading import load_model
    from specserve.runtime.profile import profile_for

    if args.threads:
        torch.set_num_threads(args.threads)
    rates = {}
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        for role, model in (("target", args.target_model), ("draft", args.draft_model)):
            if not model:
                continue
            measured = profile_for(load_model(model, dtype, args.device), role, args.device, refresh=args.refresh)
            if measured is None:
                print(f"{role} {model}: a simulated model has no cost profile")
                continue
            print(format_profile(f"{role}: {model}, {dtype}", measured), end="\n\n", flush=True)
            if role == "target":
                rates[dtype] = serving_rate(measured.costs, role)
    if {"float32", "bfloat16"} <= rates.keys():
        chosen = pick(rates)
        print(f"--dtype auto chooses {chosen}: expected tokens/s at a typical acceptance (0.6 per position), "
              f"best of plain decoding and every chain length: "
              + ", ".join(f"{d} {r * 1e3:.1f}" for d, r in rates.items()))
    return 0
