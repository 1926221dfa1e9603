"""In-process measurement of a drafter: greedy speculative decoding vs plain greedy.

One loop over the services' workers, no network: the draft proposes K tokens (one
forward each), the target scores [pending, d1..dK] in one forward and keeps the
agreeing prefix plus one target token. Reports tau (tokens per target forward during
decoding, i.e. per verification), wall-time speedup against plain greedy decoding
with the same target, the draft's and target's per-forward cost, and whether the
outputs are token-identical (asserted in float32; bf16 reports a match rate,
since batch shapes change bf16 numerics).

    python -m specserve.drafter.evaluate --draft specserve/drafts/smollm2-135m-draft --dtype bfloat16 --k 2,3,4,5,6,8
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace

import torch

from specserve.core.prompt_lookup import find_continuation
from specserve.core.sampling import SamplingConfig
from specserve.core.tree import merge_chain
from specserve.core.speculate import DraftSequenceTracker
from specserve.runtime.kv import KVSession
from specserve.runtime.models import LoadedModel
from specserve.runtime.workers import DraftWorker, FeatureDraftWorker, TargetWorker, TreeShape


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    target_forwards: int = 0  # verification passes (the prefill is not counted)
    draft_forwards: int = 0
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)  # tokens produced per verification


def plain_greedy(target: LoadedModel, prompt: list[int], max_new: int, eos: set[int]) -> Run:
    began = time.perf_counter()
    kv = KVSession(target.model)
    token = int(kv.extend(prompt)[0].argmax())
    out = [token]
    while len(out) < max_new and token not in eos:
        token = int(kv.extend([token])[0].argmax())
        out.append(token)
    return Run(out, time.perf_counter() - began, target_forwards=len(out) - 1)


def speculative_greedy(target: LoadedModel, draft: LoadedModel, prompt: list[int], max_new: int, eos: set[int], k: int,
                       tree: TreeShape | None = None, lookup_branch: bool = False) -> Run:
    """The service workers in one loop: a token draft or a feature draft (which reads the
    target's hidden states of every token added since its last call); with `tree`, a
    feature draft proposes trees of depth k and the target verifies them with tree attention."""
    greedy = SamplingConfig()
    features = draft.needs_target_hidden_states
    verifier = TargetWorker(target)
    drafter = FeatureDraftWorker(draft) if features else DraftWorker(draft)
    began = time.perf_counter()
    out = [verifier.start(prompt, greedy, 0, return_hidden_states=features)]
    drafter.start(prompt, greedy, 1)
    tracker = DraftSequenceTracker()
    tracker.reset(prompt[:1] if features else prompt)
    unsent = [verifier.last_hidden_states] if features else []  # [n, H] blocks not yet sent to the draft
    run = Run([], 0.0)
    while len(out) < max_new and out[-1] not in eos:
        seq = prompt + out  # the target's cache holds seq[:-1]; seq[-1] is pending
        t0 = time.perf_counter()
        committed, append = tracker.diff(seq)
        passes = drafter.forward_passes
        kk = min(k, max_new - len(out))
        drafted = None
        if features and tree is not None:
            drafted = drafter.propose_tree(committed, append, torch.cat(unsent), replace(tree, depth=kk))
            if lookup_branch:
                drafted = merge_chain(drafted, find_continuation(seq, kk, 3, 2))
            proposal, unsent = drafted.tokens, []
            tracker.record(seq, [])
        elif features:
            proposal, _ = drafter.propose(committed, append, kk, torch.cat(unsent))
            unsent = []
            tracker.record(seq, [])
        else:
            proposal, _ = drafter.propose(committed, append, kk)
            tracker.record(seq, proposal)
        run.draft_forwards += drafter.forward_passes - passes
        t1 = time.perf_counter()
        if drafted is not None:
            verdict = verifier.verify_tree(len(seq) - 1, seq[-1], drafted)
        else:
            verdict = verifier.verify(len(seq) - 1, [seq[-1]] + proposal, None)
        if features:
            unsent.append(verifier.last_hidden_states)
        run.target_forwards += 1
        run.draft_seconds += t1 - t0
        run.target_seconds += time.perf_counter() - t1
        tokens = verdict.tokens
        for i, t in enumerate(tokens):  # stop at the first end token, like plain decoding
            if t in eos:
                tokens = tokens[: i + 1]
                break
        tokens = tokens[: max_new - len(out)]
        run.accepted.append(len(tokens))
        out.extend(tokens)
    run.tokens, run.seconds = out, time.perf_counter() - began
    return run


def evaluate(draft_dir: str, dtype: str = "bfloat16", ks: list[int] = (4,), max_new: int = 128, n_prompts: int = 20,
             threads: int = 2, exact_check: int = 3, tree: TreeShape | None = None, lookup_branch: bool = False) -> dict:
    from specserve.drafter.data import chat_ids
    from specserve.drafter.prompts import heldout_prompts
    from specserve.loading import load_model
    from specserve.runtime.models import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer("smollm2")
    prompts = [chat_ids(tok, p) for p in heldout_prompts()[:n_prompts]]
    target = load_model("smollm2", dtype=dtype)
    draft = load_model(draft_dir, dtype=dtype)
    eos = set(target.eos_token_ids)
    report: dict = {"dtype": dtype, "prompts": len(prompts), "max_new": max_new, "threads": threads,
                    "tree": None if tree is None else vars(tree), "lookup_branch": lookup_branch}

    # Warm up both models once (first calls allocate).
    plain_greedy(target, prompts[0], 8, eos)
    speculative_greedy(target, draft, prompts[0], 8, eos, 4)
    plain = [plain_greedy(target, p, max_new, eos) for p in prompts]
    plain_s = sum(r.seconds for r in plain)
    plain_tok = sum(len(r.tokens) for r in plain)
    report["plain"] = {"tokens": plain_tok, "seconds": round(plain_s, 2), "tok_per_s": round(plain_tok / plain_s, 2),
                       "ms_per_target_forward": round(1e3 * plain_s / sum(r.target_forwards + 1 for r in plain), 2)}
    for k in ks:
        runs = [speculative_greedy(target, draft, p, max_new, eos, k, tree, lookup_branch) for p in prompts]
        steps = [a for r in runs for a in r.accepted]
        secs = sum(r.seconds for r in runs)
        toks = sum(len(r.tokens) for r in runs)
        report[f"k={k}"] = {
            "tau": round(sum(steps) / len(steps), 3),
            "tok_per_s": round(toks / secs, 2),
            "speedup": round((toks / secs) / (plain_tok / plain_s), 3),
            "draft_ms_per_forward": round(1e3 * sum(r.draft_seconds for r in runs) / sum(r.draft_forwards for r in runs), 2),
            "target_ms_per_verify": round(1e3 * sum(r.target_seconds for r in runs) / sum(r.target_forwards for r in runs), 2),
            "identical_outputs": sum(r.tokens == p.tokens for r, p in zip(runs, plain)),
        }
        print(f"k={k}", json.dumps(report[f"k={k}"]), flush=True)
    if exact_check and dtype != "float32":
        report["float32_exact"] = check_exact(draft_dir, prompts[:exact_check], max_new, ks[0], eos, tree)
    elif exact_check:
        report["float32_exact"] = all(report[f"k={k}"]["identical_outputs"] == len(prompts) for k in ks)
    return report


def check_exact(draft_dir: str, prompts: list[list[int]], max_new: int, k: int, eos: set[int], tree: TreeShape | None = None) -> bool:
    """Speculative output == plain greedy output, token for token, in float32."""
    from specserve.loading import load_model

    target = load_model("smollm2", dtype="float32")
    draft = load_model(draft_dir, dtype="float32")
    ok = all(plain_greedy(target, p, max_new, eos).tokens == speculative_greedy(target, draft, p, max_new, eos, k, tree).tokens
             for p in prompts)
    print(f"float32 exactness on {len(prompts)} prompts: {ok}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="specserve/drafts/smollm2-135m-draft")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--k", default="4", help="comma-separated proposal lengths")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact-check", type=int, default=3, help="prompts checked for float32 exactness (0: skip)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--tree", default=None, help="nodes,width,branch: a feature draft proposes trees of depth K")
    ap.add_argument("--lookup-branch", action="store_true", help="add prompt lookup's continuation to every tree")
    a = ap.parse_args(argv)
    tree = None
    if a.tree:
        nodes, width, branch = (int(x) for x in a.tree.split(","))
        tree = TreeShape(depth=1, width=width, branch=branch, nodes=nodes)
    report = evaluate(a.draft, a.dtype, [int(x) for x in a.k.split(",")], a.max_new, a.prompts, a.threads, a.exact_check, tree, a.lookup_branch)
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
