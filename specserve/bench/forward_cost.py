"""What one target forward pass costs for k new tokens, per dtype and thread count.

Speculative decoding pays when scoring k tokens costs little more than scoring one.
This prints the median wall time of a forward over k new tokens on a 200-token
cache (the chain path with logits for every new token, and the tree path: tree
attention, hidden states and the LM head), so the break-even tau of each setting
can be read off: cost(k) / cost(1).

    python -m specserve.bench.forward_cost --threads 1,2 --k 1,5,17
"""

from __future__ import annotations

import argparse
import time

import torch

from specserve.core.tree import DraftTree, ancestor_mask
from specserve.runtime.kv import KVSession
from specserve.runtime.models import load_model


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
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--k", default="1,5,17")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    print("| dtype | threads | " + " | ".join(f"k={k} chain / tree ms" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for dtype in a.dtypes.split(","):
        loaded = load_model(a.model, dtype=dtype)
        for threads in (int(x) for x in a.threads.split(",")):
            torch.set_num_threads(threads)
            kv = KVSession(loaded.model)
            kv.extend(list(range(100, 100 + a.context)))
            cells = []
            for k in ks:
                new = list(range(1000, 1000 + k))
                tree = DraftTree.chain(new[1:])

                def chain():
                    kv.extend(new, logits_for=k)
                    kv.rollback(a.context)

                def tree_verify():
                    with torch.inference_mode():
                        hidden = kv.extend_masked(new, [a.context + d for d in [0, *tree.depths()]], ancestor_mask(tree),
                                                  module=loaded.model.model).last_hidden_state[0]  # [k, H]
                        loaded.model.lm_head(hidden)
                    kv.rollback(a.context)

                chain()  # warm up
                cells.append(f"{median_ms(chain, a.repeats):.1f} / {median_ms(tree_verify, a.repeats):.1f}")
            print(f"| {dtype} | {threads} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
