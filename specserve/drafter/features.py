"""Training data for a feature draft: the target's hidden states and distributions.

For each self-distillation record (prompt + the target's own greedy response, see
data.py) the target reads the whole sequence once (teacher forcing) and we keep,
at every position, its last hidden state (after the final norm: what the LM head
reads) and its top-k log-probabilities. One forward pass per record, no padding.
Shards mirror data.py's: features/shard_XXXXX.pt for data/shard_XXXXX.pt, written
once each, so an interrupted run resumes and generation can still be adding shards.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm


@torch.inference_mode()
def target_features(model, token_ids: list[int], topk: int) -> dict:
    """hidden [L, H] (bf16), top_ids [L, k] (int32), top_lp [L, k] (fp16) for one sequence."""
    input_ids = torch.tensor([token_ids], dtype=torch.long)  # [1, L]
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # [L, H]
    logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)  # [L, V]
    top_lp, top_ids = logp.topk(topk, dim=-1)  # [L, k]
    return {"hidden": hidden.to(torch.bfloat16), "top_ids": top_ids.to(torch.int32), "top_lp": top_lp.to(torch.float16)}


def extract_features(data_dir: str | Path, out_dir: str | Path, target: str = "smollm2", dtype: str = "float32",
                     topk: int = 8, threads: int = 1, time_budget_s: float | None = None) -> Path:
    """Writes out_dir/shard_XXXXX.pt for every data shard that has none yet."""
    from specserve.drafter.data import load_shard
    from specserve.runtime.models import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    model = load_model(target, dtype=dtype).model
    todo = [p for p in sorted(Path(data_dir).glob("shard_*.pt")) if not (out_dir / p.name).exists()]
    began, tokens = time.time(), 0
    bar = tqdm(todo, desc="features", unit="shard")
    for path in bar:
        if time_budget_s is not None and time.time() - began > time_budget_s:
            break
        rows = []
        for record in load_shard(path):
            sequence = record["prompt"] + record["response"]
            rows.append({"tokens": sequence, "prompt_len": len(record["prompt"]), **target_features(model, sequence, topk)})
            tokens += len(sequence)
        torch.save(rows, (out_dir / path.name).with_suffix(".tmp"))
        (out_dir / path.name).with_suffix(".tmp").rename(out_dir / path.name)
        bar.set_postfix(tok=tokens, tok_s=f"{tokens / (time.time() - began):.0f}")
    return out_dir


def load_feature_records(feature_dir: str | Path) -> list[dict]:
    records: list[dict] = []
    for path in sorted(Path(feature_dir).glob("shard_*.pt")):
        records.extend(torch.load(path, weights_only=False))
    return records


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--topk", type=int, default=8)
    a = ap.parse_args()
    extract_features(a.data_dir, a.out_dir, dtype=a.dtype, threads=a.threads, topk=a.topk)
