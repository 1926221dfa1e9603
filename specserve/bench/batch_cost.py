"""What an engine's forward_batch of B single-token decode rows costs against one session alone.

    python -m specserve.bench.batch_cost --engine torch --dtype bfloat16 [--batches 1,4,16,64] [--prompt 64]
    python -m specserve.bench.batch_cost --engine llama.cpp
    python -m specserve.bench.batch_cost --engine compiled --dtype int8 --batches 1,4,16

Each of B sessions holds a `--prompt`-token cache; one step decodes one token for each, in one
forward_batch, and is undone by rollback. "alone" is one session's single-token step, timed
interleaved with the batch. On llama.cpp the B sessions share one context of B slots and the
lone session has a private one. Prints median milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from specserve.bench.batching import cpu_description
from specserve.loading import load_model
from specserve.runtime.engine import Forward, run_forward


def median_ms(steps, undos, repeats: int) -> list[float]:
    """Median ms of each step, the steps interleaved so that load on the machine hits all alike."""
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, undo, out in zip(steps, undos, times):
            start = time.perf_counter()
            step()
            out.append((time.perf_counter() - start) * 1000)
            undo()
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--engine", default="llama.cpp", choices=["torch", "llama.cpp", "compiled"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"],
                        help="the torch and compiled engines' (int8: compiled only)")
    args = parser.parse_args()
    if args.threads and args.engine != "llama.cpp":
        import torch

        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    prompt = [1000 + i for i in range(args.prompt)]
    base = load_model("smollm2", args.dtype, engine=args.engine, threads=args.threads)
    if args.engine == "llama.cpp":
        from specserve.runtime.llama_engine import LlamaEngine

        lone_engine = LlamaEngine("smollm2", base.path, threads=base.threads, context_tokens=1024, batch_slots=1)
        engines = lambda b: LlamaEngine("smollm2", base.path, threads=base.threads, context_tokens=1024,  # noqa: E731
                                        batch_slots=max(b, 1))
    else:
        lone_engine, engines = base, lambda b: base  # noqa: E731
    one = lone_engine.new_session()
    run_forward(Forward(one, prompt, logits_for=0))
    threads = getattr(base, "threads", None) or __import__("torch").get_num_threads()
    print(f"CPU: {cpu_description()}; {args.engine} {base.dtype_name}, {threads} threads; model smollm2; cache {args.prompt} tokens each")
    print(f"{'B':>4} {'alone ms':>9} {'forward_batch ms':>17} {'ms per row':>11} {'vs B steps alone':>17}")
    for b in batches:
        engine = engines(b)
        sessions = [engine.new_session() for _ in range(b)]
        for s in sessions:
            run_forward(Forward(s, prompt, logits_for=0))

        def undo():
            for s in sessions:
                s.rollback(args.prompt)

        alone, ms = median_ms([lambda: run_forward(Forward(one, [5])),
                               lambda: engine.forward_batch([Forward(s, [5]) for s in sessions])],
                              [lambda: one.rollback(args.prompt), undo], args.repeats)
        print(f"{b:>4} {alone:>9.2f} {ms:>17.2f} {ms / b:>11.2f} {b * alone / ms:>16.2f}x")
        for s in sessions:
            s.close()
        if engine is not base:
            engine.close()
    one.close()
    if lone_engine is not base:
        lone_engine.close()
        base.close()


if __name__ == "__main__":
    main()
