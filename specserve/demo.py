"""`make demo`: the whole stack on the default model, one streamed generation, its speedup."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from specserve.client import connect, describe, generate
from specserve.launcher import Stack, StackConfig
from specserve.runtime.models import cache_root


def run_demo(args: argparse.Namespace, config: StackConfig, make_request) -> int:
    method = args.method or config.default_method
    # Service logs go to files, so the terminal shows the generation only.
    config = dataclasses.replace(config, log_dir=config.log_dir or cache_root() / "demo-logs")
    print(f"starting target ({config.target_model}, dtype {config.dtype}, engine {config.engine}), "
          f"draft ({config.draft_model or 'none'}), orchestrator and n-gram store (logs in {config.log_dir}) ...",
          file=sys.stderr, flush=True)
    with Stack(config) as stack:
        for role, run in stack.services.items():
            chosen = "the GGUF file's own types" if run.dtype == "auto" else run.dtype
            print(f"{role}: {run.engine} engine, {chosen}" + (" (dtype auto: measured to serve best here; `specserve "
                  "profile` shows why)" if config.dtype == "auto" and run.engine == "torch" else ""), file=sys.stderr, flush=True)
        channel, stub = connect(stack.address)
        with channel:
            generate(stub, make_request(args, "Hello", "autoregressive"))  # warm-up: first passes are slow
            print(f"\n>>> {args.prompt}\n", flush=True)
            result = generate(stub, make_request(args, args.prompt, method), on_text=lambda t: print(t, end="", flush=True))
            print("\n", flush=True)
            print(describe(result.stats), flush=True)
            baseline = generate(stub, make_request(args, args.prompt, "autoregressive"))
            print(describe(baseline.stats), flush=True)
            # A ratio of tokens per second: outputs may differ in length (bf16).
            rate = result.stats.generated_tokens / max(result.stats.wall_time_ms, 1e-9)
            speedup = rate / max(baseline.stats.generated_tokens / max(baseline.stats.wall_time_ms, 1e-9), 1e-12)
            same = "identical to" if baseline.token_ids == result.token_ids else "different from"
            print(f"speedup of {method} over plain decoding: {speedup:.2f}x; output {same} plain decoding's", flush=True)
    return 0
