"""Distil a draft model from the target on the target's own greedy responses.

Pipeline (`specserve train-token-draft`):
1. data: the target answers synthetic chat prompts greedily (batched, bf16) and
   its top-k log-probs at every generated position are recorded (data.py);
2. vocabulary: the head covers the `vocab_size` most frequent response tokens;
3. model: a few target decoder layers + the target's embedding (frozen) + a head
   initialised from the (tied) embedding rows of the kept tokens (model.py);
4. loss on response positions: cross-entropy to the target's top-k distribution
   renormalised over the head's vocabulary + `hard_weight` x cross-entropy to the
   target's greedy token (when the head covers it);
5. AdamW, warmup + cosine, fp32, resumable checkpoints, fixed seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.drafter.data import generate_data, load_records
from specserve.drafter.model import DraftLM, build_from_target, save_drafter
from specserve.runtime.models import cache_root


def choose_vocab(records: list[dict], size: int, must: set[int]) -> torch.Tensor:
    """The `size` most frequent response tokens (plus `must`), sorted by id: [V_out].

    Ties (and the slots left once every response token is in) go to the tokens that
    appear most often among the target's top-k alternatives.
    """
    counts = Counter(t for r in records for t in r["response"])
    alternatives = Counter(torch.cat([r["top_ids"].flatten() for r in records]).tolist())
    ranked = sorted(set(counts) | set(alternatives), key=lambda t: (-counts.get(t, 0), -alternatives.get(t, 0), t))
    kept = set(must)
    for t in ranked:
        if len(kept) >= size:
            break
        kept.add(t)
    covered = sum(c for t, c in counts.items() if t in kept) / max(1, sum(counts.values()))
    print(f"vocab: {len(kept)} tokens cover {covered:.4f} of {sum(counts.values())} response tokens ({len(counts)} distinct)")
    return torch.tensor(sorted(kept), dtype=torch.long)


def make_batches(records: list[dict], tokens_per_batch: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by length so padding is small; shuffled batch order."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]["prompt"]) + len(records[i]["response"]))
    batches, current, longest = [], [], 0
    for i in order:
        n = len(records[i]["prompt"]) + len(records[i]["response"])
        if current and max(longest, n) * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(records: list[dict], index_of: torch.Tensor, pad_id: int):
    """Right-padded inputs and targets for response positions.

    Returns input_ids [B, S], rows/cols [N] (positions predicting response tokens),
    hard [N] (head index of the greedy token, -1 if outside the head),
    soft_idx [N, k] (head indices of the target's top-k, -1 if outside), soft_lp [N, k].
    """
    width = max(len(r["prompt"]) + len(r["response"]) for r in records) - 1
    input_ids = torch.full((len(records), width), pad_id, dtype=torch.long)  # [B, S]
    rows, cols, hard, soft_idx, soft_lp = [], [], [], [], []
    for b, r in enumerate(records):
        seq = torch.tensor(r["prompt"] + r["response"])
        input_ids[b, : len(seq) - 1] = seq[:-1]
        n, p = len(r["response"]), len(r["prompt"])
        rows.append(torch.full((n,), b))
        cols.append(torch.arange(p - 1, p - 1 + n))  # position p-1+t predicts response[t]
        hard.append(index_of[torch.tensor(r["response"])])
        soft_idx.append(index_of[r["top_ids"].long()])
        soft_lp.append(r["top_lp"].float())
    return input_ids, torch.cat(rows), torch.cat(cols), torch.cat(hard), torch.cat(soft_idx), torch.cat(soft_lp)


def loss_fn(model: DraftLM, batch, hard_weight: float):
    """(loss, top-1 agreement with the target's greedy token) on response positions."""
    input_ids, rows, cols, hard, soft_idx, soft_lp = batch
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, S, H]
    logq = torch.log_softmax(model.lm_head(hidden[rows, cols]).float(), dim=-1)  # [N, V_out]
    valid = soft_idx >= 0  # [N, k]
    p = torch.softmax(soft_lp.masked_fill(~valid, -1e4), dim=-1) * valid  # [N, k] renormalised over the head
    soft = -(p * logq.gather(1, soft_idx.clamp(min=0))).sum(-1)  # [N]
    has_soft = valid.any(-1)
    covered = hard >= 0
    hard_ce = -logq.gather(1, hard.clamp(min=0)[:, None])[:, 0]  # [N]
    loss = (soft * has_soft).sum() / has_soft.sum().clamp(min=1) + hard_weight * (hard_ce * covered).sum() / covered.sum().clamp(min=1)
    agree = ((logq.argmax(-1) == hard) & covered).float().mean()
    return loss, agree


def train_draft(out_dir: str | Path, steps: int = 600, seed: int = 0, data_dir: str | Path | None = None,
                work_dir: str | Path | None = None, target: str = "smollm2", layers: list[int] | None = None,
                vocab_size: int = 8192, prompts: int = 2048, gen_batches: int | None = None, gen_shards: list[int] | None = None, max_new: int = 192,
                tokens_per_batch: int = 2048, lr: float = 1e-3, hard_weight: float = 0.5, save_every: int = 50,
                threads: int = 2) -> Path:
    """Generates data if needed, trains, writes the drafter directory to out_dir."""
    from specserve.runtime.models import load_model

    began = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    layers = layers or [0, 1]
    data_dir = Path(data_dir) if data_dir else cache_root() / "draft-data"
    work_dir = Path(work_dir or data_dir.parent / "draft-train")
    work_dir.mkdir(parents=True, exist_ok=True)
    if not any(Path(data_dir).glob("shard_*.pt")):
        generate_data(data_dir, prompts, max_new=max_new, seed=seed, target=target, max_batches=gen_batches, shards=gen_shards)
    records = load_records(data_dir)
    rng.shuffle(records)
    ckpt = work_dir / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    held_keys = state["held"] if state else {tuple(r["prompt"]) for r in records[: max(8, len(records) // 32)]}
    held = [r for r in records if tuple(r["prompt"]) in held_keys]
    train = [r for r in records if tuple(r["prompt"]) not in held_keys]
    n_tokens = sum(len(r["response"]) for r in train)
    print(f"data: {len(train)} train / {len(held)} held-out responses, {n_tokens} train response tokens")

    target_model = load_model(target, dtype="float32").model
    eos = set(int(t) for t in ([target_model.config.eos_token_id] if isinstance(target_model.config.eos_token_id, int) else target_model.config.eos_token_id))
    vocab_ids = state["vocab_ids"] if state else choose_vocab(train, vocab_size, eos)  # [V_out]
    model = build_from_target(target_model, layers, vocab_ids)
    del target_model
    index_of = torch.full((model.config.vocab_size,), -1, dtype=torch.long)  # token id -> head index
    index_of[vocab_ids] = torch.arange(len(vocab_ids))
    pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else min(eos))

    model.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    step = 0
    if state:
        if state["layers"] != layers:
            raise ValueError(f"{ckpt} was trained with layers {state['layers']}; remove it to start afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, rng = state["step"], state["rng"]
        print(f"resumed from {ckpt} at step {step}")
    held_batches = [collate([held[i] for i in b], index_of, pad_id) for b in make_batches(held, tokens_per_batch, random.Random(0))]

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            results = [loss_fn(model, b, hard_weight) for b in held_batches]
        model.train()
        return sum(r[0].item() for r in results) / len(results), sum(r[1].item() for r in results) / len(results)

    print("held-out loss %.3f agree %.3f (initial)" % evaluate())
    model.train()
    queue: list[list[int]] = []
    bar = tqdm(total=steps, initial=step, desc="train", unit="step")
    while step < steps:
        if not queue:  # a new epoch; pick up shards written since (generation may still be running)
            train = [r for r in load_records(data_dir) if tuple(r["prompt"]) not in held_keys]
            queue = make_batches(train, tokens_per_batch, rng)
            tqdm.write(f"epoch: {len(train)} responses, {sum(len(r['response']) for r in train)} response tokens")
        batch = collate([train[i] for i in queue.pop()], index_of, pad_id)
        loss, agree = loss_fn(model, batch, hard_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if step % save_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                        "rng": rng, "vocab_ids": vocab_ids, "layers": layers, "held": held_keys}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").rename(ckpt)
        if step % (save_every * 4) == 0 and step < steps:
            tqdm.write("step %d held-out loss %.3f agree %.3f" % (step, *evaluate()))
            save_drafter(model, out_dir, target_spec=target, extra={"training": {"steps": step, "partial": True}})
    bar.close()
    held_loss, held_agree = evaluate()
    print(f"final held-out loss {held_loss:.3f} agree {held_agree:.3f}")
    n_tokens = sum(len(r["response"]) for r in train)
    shards = sorted(int(p.stem.split("_")[1]) for p in Path(data_dir).glob("shard_*.pt"))
    extra = {"training": {"steps": steps, "data_shards": shards, "seed": seed, "layers_from_target": layers, "vocab_out": len(vocab_ids),
                          "train_responses": len(train), "train_response_tokens": n_tokens, "tokens_per_batch": tokens_per_batch,
                          "lr": lr, "hard_weight": hard_weight, "held_out_loss": round(held_loss, 4),
                          "held_out_top1_agreement": round(held_agree, 4), "wall_time_s_this_run": round(time.time() - began)}}
    save_drafter(model, out_dir, target_spec=target, extra=extra)
    print(json.dumps(extra))
    return Path(out_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="specserve/drafts/smollm2-135m-draft", help="drafter directory to write")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="self-distillation shards, generated if empty (default: draft-data in the specserve cache)")
    parser.add_argument("--work-dir", default=None, help="checkpoints (default: next to data-dir)")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--layers", default="0,1", help="target layers copied into the draft, comma-separated")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokens covered by the draft's head")
    parser.add_argument("--prompts", type=int, default=2048, help="synthetic prompts to generate responses for")
    parser.add_argument("--gen-batches", type=int, default=None, help="generate only this many batches of 24 prompts")
    parser.add_argument("--gen-shards", default=None, help="generate exactly these batch indices, comma-separated")
    parser.add_argument("--max-new", type=int, default=192)
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    train_draft(args.out, steps=args.steps, seed=args.seed, data_dir=args.data_dir, work_dir=args.work_dir, target=args.target,
                layers=[int(x) for x in args.layers.split(",")], vocab_size=args.vocab_size, prompts=args.prompts,
                gen_batches=args.gen_batches,
                gen_shards=[int(x) for x in args.gen_shards.split(",")] if args.gen_shards else None, max_new=args.max_new, tokens_per_batch=args.tokens_per_batch, lr=args.lr,
                hard_weight=args.hard_weight, save_every=args.save_every, threads=args.threads)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve train-token-draft", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
