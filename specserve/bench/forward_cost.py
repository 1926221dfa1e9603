"""What one target forward pass costs for k new tokens, per engine, dtype and thread count.

Speculative decoding pays when scoring k tokens costs little more than scoring one.
This prints the median wall time of a forward over k new tokens on a 200-token
cache through the engine interface (the chain path with logits for every new token,
and the tree path: tree attention, hidden states and the LM head), so the break-even
tau of each setting can be read off: cost(k) / cost(1).

    python -m specserve.bench.forward_cost --engines torch,llama.cpp --threads 2 --k 1,2,4,8,16
    python -m specserve.bench.forward_cost --engines torch,compiled --dtypes float32,bfloat16,int8 --threads 2

The compiled engine compiles its buckets at load (reported as "compile s"; inductor's cache
makes later loads quicker); int8 is its dtype only.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from specserve.core.tree import DraftTree, ancestor_mask
from specserve.loading import load_model
from specserve.runtime.profile import machine_facts

DTYPED_ENGINES = {"torch": ("float32", "bfloat16"), "compiled": ("float32", "bfloat16", "int8")}  # the dtypes each takes


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--engines", default="torch", help="comma-separated: torch, compiled, llama.cpp")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="the torch and compiled engines' (llama.cpp runs the GGUF's types; int8: compiled only)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--k", default="1,5,17")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    facts = machine_facts()
    print(f"# {facts['cpu']} ({', '.join(facts['flags'])}), torch {facts['torch']}, load average {os.getloadavg()[0]:.2f}; "
          f"median of {a.repeats} after a {a.context}-token context")
    print("| engine | dtype | threads | compile s | " + " | ".join(f"k={k} chain / tree ms" for k in ks) + " |")
    print("|---|---|---|---|" + "---|" * len(ks))
    for engine_name in a.engines.split(","):
        dtypes = [d for d in a.dtypes.split(",") if d in DTYPED_ENGINES[engine_name]] if engine_name in DTYPED_ENGINES else ["-"]
        for dtype in dtypes:
            for threads in (int(x) for x in a.threads.split(",")):
                torch.set_num_threads(threads)
                engine = load_model(a.model, dtype=dtype if dtype != "-" else "float32", engine=engine_name, threads=threads)
                compile_s = f"{engine.compile_s:.1f}" if hasattr(engine, "compile_s") else "-"
                cells = [measure(engine.new_session(), k, a.context, a.repeats, engine.supports_trees) for k in ks]
                print(f"| {engine.engine_name} | {engine.dtype_name} | {threads} | {compile_s} | " + " | ".join(cells) + " |",
                      flush=True)
    return 0


def measure(session, k: int, context: int, repeats: int, trees: bool) -> str:
    """'chain / tree' median ms of a forward over k new tokens after `context` tokens."""
    if session.length != context:
        session.rollback(0)
        session.extend(list(range(100, 100 + context)))
    new = list(range(1000, 1000 + k))
    tree = DraftTree.chain(new[1:])
    positions = [context + d for d in [0, *tree.depths()]]

    def chain():
        session.extend(new, logits_for=k)
        session.rollback(context)

    def tree_verify():
        session.extend_tree(new, positions, ancestor_mask(tree), return_hidden=True)
        session.rollback(context)

    chain()  # warm up
    tree_ms = f"{median_ms(tree_verify, repeats):.1f}" if trees else "-"
    return f"{median_ms(chain, repeats):.1f} / {tree_ms}"


if __name__ == "__main__":
    raise SystemExit(main())
