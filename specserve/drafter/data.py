"""Self-distillation data: the target's own greedy responses, with its top-k log-probs.

Batched greedy generation (left padding) under the chat template. A logits
processor records the target's top-k log-probabilities (full-vocab softmax) at
every generated position, so the soft targets for distillation cost nothing
extra. Shards are written one per batch; an interrupted run resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from specserve.drafter.prompts import make_prompts


class TopKRecorder(LogitsProcessor):
    """Records top-k log-probs of every step; leaves the scores unchanged."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
        values, indices = logp.topk(self.k, dim=-1)  # [B, k]
        self.steps.append((indices.to(torch.int32), values.to(torch.float16)))
        return scores


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@torch.inference_mode()
def generate_batch(model, prompts_ids: list[list[int]], pad_id: int, eos_ids: set[int], max_new: int, topk: int) -> list[dict]:
    """Greedy responses for one batch: records of prompt, response and top-k soft targets."""
    width = max(len(p) for p in prompts_ids)
    input_ids = torch.full((len(prompts_ids), width), pad_id, dtype=torch.long)  # [B, W]
    mask = torch.zeros_like(input_ids)  # [B, W]
    for i, p in enumerate(prompts_ids):
        input_ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    recorder = TopKRecorder(topk)
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
        logits_processor=LogitsProcessorList([recorder]), pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
    )
    generated = out[:, width:]  # [B, T]
    top_ids = torch.stack([s[0] for s in recorder.steps], dim=1)  # [B, T, k]
    top_lp = torch.stack([s[1] for s in recorder.steps], dim=1)  # [B, T, k]
    records = []
    for i, p in enumerate(prompts_ids):
        row = generated[i].tolist()
        n = len(row)
        for j, t in enumerate(row):
            if t in eos_ids:
                n = j + 1  # keep the end token: the draft should predict it too
                break
        records.append({"prompt": p, "response": row[:n], "top_ids": top_ids[i, :n].clone(), "top_lp": top_lp[i, :n].clone()})
    return records


def generate_data(out_dir: str | Path, n_prompts: int, batch_size: int = 24, max_new: int = 192, topk: int = 16,
                  seed: int = 0, target: str = "smollm2", dtype: str = "float32", time_budget_s: float | None = None,
                  max_batches: int | None = None, threads: int = 1, worker: int = 0, workers: int = 1,
                  shards: list[int] | None = None) -> Path:
    """Writes shards out_dir/shard_XXXXX.pt (lists of records); skips shards that exist."""
    from specserve.runtime.models import load_model, load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)  # 1 thread per process: robust when the cores are shared
    tokenizer = load_tokenizer(target)
    loaded = load_model(target, dtype=dtype)  # fp32: batched bf16 matmuls are slow on AVX2
    prompts = [chat_ids(tokenizer, p) for p in make_prompts(n_prompts, seed)]
    # Batches of similar prompt length waste less padding; shard i is always the same prompts.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # Interleave long and short batches so a time budget still yields a mix.
    rng = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(batches), generator=rng).tolist()[:max_batches]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(loaded.eos_token_ids)
    began = time.time()
    tokens = 0
    if shards is not None:  # exactly these batches (e.g. those a shipped draft was trained on)
        perm = [i for i in shards if i < len(batches)]
    perm = perm[worker::workers]  # several single-thread processes split the batches
    bar = tqdm(perm, desc="generate", unit="batch")
    for shard in bar:
        path = out_dir / f"shard_{shard:05d}.pt"
        if path.exists():
            continue
        if time_budget_s is not None and time.time() - began > time_budget_s:
            break
        records = generate_batch(loaded.model, [prompts[i] for i in batches[shard]], pad_id, set(loaded.eos_token_ids), max_new, topk)
        torch.save(records, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        tokens += sum(len(r["response"]) for r in records)
        bar.set_postfix(tok=tokens, tok_s=f"{tokens / (time.time() - began):.0f}")
    return out_dir


def load_shard(path: str | Path) -> list[dict]:
    return torch.load(path, weights_only=False)


def load_records(data_dir: str | Path) -> list[dict]:
    records: list[dict] = []
    for path in sorted(Path(data_dir).glob("shard_*.pt")):
        records.extend(load_shard(path))
    return records


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--prompts", type=int, default=1536)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--max-new", type=int, default=192)
    ap.add_argument("--budget-min", type=float, default=None)
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    generate_data(a.out_dir, a.prompts, a.batch_size, a.max_new, time_budget_s=a.budget_min and a.budget_min * 60,
                  worker=a.worker, workers=a.workers)
