"""Train a feature draft (feature_model.py) on the target's hidden states (features.py).

For every position j of a record, pair j = (h[j-1], x[j]) goes in and the draft
predicts h[j]; its logits over the head's vocabulary are scored against the
target's own distribution at j. Loss:
    cross-entropy to the target's top-k distribution (renormalised over the head)
  + hard_weight x cross-entropy to the target's greedy token
  + feature_weight x smooth-L1 between the predicted and the true h[j].
Drafting k tokens feeds predicted states back in, so a second pass ("unroll")
replaces every input state but the first of each sequence with the first pass's
prediction and is scored the same way: the draft learns to read its own outputs.
AdamW, warmup + cosine, fp32, resumable checkpoints, fixed seed.

The shipped draft starts from the trained token draft (`--init-from`): its layers,
norm and head, with the new input projection ignoring the hidden state at first,
so training begins at the token draft's accuracy and learns to read the target.
Without it, the draft starts from the target's last layer and embedding rows.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specserve.drafter.feature_model import FeatureDraft, build_feature_draft, save_feature_draft
from specserve.drafter.features import load_feature_records


def choose_vocab(records: list[dict], size: int, must: set[int]) -> torch.Tensor:
    """The `size` tokens the target predicts most often (greedy, every position), sorted: [V_out]."""
    counts = Counter(torch.cat([r["top_ids"][:, 0] for r in records]).tolist())
    alternatives = Counter(torch.cat([r["top_ids"][:, 1:].flatten() for r in records]).tolist())
    ranked = sorted(set(counts) | set(alternatives), key=lambda t: (-counts.get(t, 0), -alternatives.get(t, 0), t))
    kept = set(must)
    for t in ranked:
        if len(kept) >= size:
            break
        kept.add(t)
    covered = sum(c for t, c in counts.items() if t in kept) / max(1, sum(counts.values()))
    print(f"vocab: {len(kept)} tokens cover {covered:.4f} of the target's greedy predictions ({len(counts)} distinct)")
    return torch.tensor(sorted(kept), dtype=torch.long)


def make_batches(records: list[dict], tokens_per_batch: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by length so padding is small; shuffled batch order."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]["tokens"]))
    batches, current, longest = [], [], 0
    for i in order:
        n = len(records[i]["tokens"])
        if current and max(longest, n) * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(records: list[dict], index_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-padded pairs and targets. S = longest record - 1 (pairs j = 1..L-1).

    ids [B, S] x[j]; state_in [B, S, H] h[j-1]; state_out [B, S, H] h[j]; valid [B, S];
    hard [B, S] head index of the target's greedy token at j (-1 outside the head);
    soft_idx [B, S, k] (-1 outside), soft_lp [B, S, k].
    """
    width = max(len(r["tokens"]) for r in records) - 1
    hidden = records[0]["hidden"].shape[1]
    k = records[0]["top_ids"].shape[1]
    out = {
        "ids": torch.zeros(len(records), width, dtype=torch.long),
        "state_in": torch.zeros(len(records), width, hidden),
        "state_out": torch.zeros(len(records), width, hidden),
        "valid": torch.zeros(len(records), width, dtype=torch.bool),
        "soft_idx": torch.full((len(records), width, k), -1, dtype=torch.long),
        "soft_lp": torch.zeros(len(records), width, k),
    }
    for b, r in enumerate(records):
        n = len(r["tokens"]) - 1
        out["ids"][b, :n] = torch.tensor(r["tokens"][1:])
        out["state_in"][b, :n] = r["hidden"][:-1].float()
        out["state_out"][b, :n] = r["hidden"][1:].float()
        out["valid"][b, :n] = True
        out["soft_idx"][b, :n] = index_of[r["top_ids"][1:].long()]
        out["soft_lp"][b, :n] = r["top_lp"][1:].float()
    out["hard"] = out["soft_idx"][..., 0]
    return out


def pass_loss(model: FeatureDraft, batch: dict, state_in: torch.Tensor, hard_weight: float, feature_weight: float):
    """(loss, greedy agreement, predicted states [B, S, H]) for one pass."""
    logits, predicted = model(batch["ids"], state_in, use_cache=False)  # [B, S, V_out], [B, S, H]
    valid = batch["valid"]
    logq = torch.log_softmax(logits[valid].float(), dim=-1)  # [N, V_out]
    soft_idx, soft_lp, hard = batch["soft_idx"][valid], batch["soft_lp"][valid], batch["hard"][valid]
    in_head = soft_idx >= 0  # [N, k]
    p = torch.softmax(soft_lp.masked_fill(~in_head, -1e4), dim=-1) * in_head  # [N, k]
    soft = -(p * logq.gather(1, soft_idx.clamp(min=0))).sum(-1)  # [N]
    has_soft = in_head.any(-1)
    covered = hard >= 0
    hard_ce = -logq.gather(1, hard.clamp(min=0)[:, None])[:, 0]  # [N]
    feature = F.smooth_l1_loss(predicted[valid], batch["state_out"][valid])
    loss = ((soft * has_soft).sum() / has_soft.sum().clamp(min=1)
            + hard_weight * (hard_ce * covered).sum() / covered.sum().clamp(min=1)
            + feature_weight * feature)
    agree = ((logq.argmax(-1) == hard) & covered).float().mean()
    return loss, agree, predicted


def batch_loss(model: FeatureDraft, batch: dict, hard_weight: float, feature_weight: float, unroll: bool, noise: float):
    state_in = batch["state_in"]
    if noise and model.training:
        state_in = state_in + noise * torch.randn_like(state_in)
    loss1, agree1, predicted = pass_loss(model, batch, state_in, hard_weight, feature_weight)
    if not unroll:
        return loss1, agree1, agree1
    # Pair j now reads the first pass's prediction of h[j-1] (pair 1 keeps the true h[0]).
    fed_back = torch.cat([batch["state_in"][:, :1], predicted[:, :-1].detach()], dim=1)  # [B, S, H]
    loss2, agree2, _ = pass_loss(model, batch, fed_back, hard_weight, feature_weight)
    return (loss1 + loss2) / 2, agree1, agree2


def train_feature_draft(out_dir: str | Path, feature_dirs: list[str | Path], work_dir: str | Path, steps: int = 1000,
                        seed: int = 0, target: str = "smollm2", vocab_size: int = 8192, tokens_per_batch: int = 4096,
                        lr: float = 1e-3, hard_weight: float = 0.5, feature_weight: float = 1.0, unroll: bool = True,
                        noise: float = 0.05, save_every: int = 50, threads: int = 1, held_out: int = 16,
                        init_from: str | Path | None = None) -> Path:
    """Trains a feature draft; `init_from` (a token drafter directory) starts it from that draft's
    layers, norm and head instead of the target's last layer and embedding rows."""
    from specserve.runtime.models import load_model

    began = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    def load_all() -> list[dict]:
        return [r for d in feature_dirs for r in load_feature_records(d)]

    records = load_all()
    ckpt = work_dir / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if state:
        held_keys = state["held"]
    else:
        shuffled = list(records)
        random.Random(seed).shuffle(shuffled)
        held_keys = {tuple(r["tokens"][: r["prompt_len"]]) for r in shuffled[:held_out]}

    def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
        held = [r for r in rows if tuple(r["tokens"][: r["prompt_len"]]) in held_keys]
        return [r for r in rows if tuple(r["tokens"][: r["prompt_len"]]) not in held_keys], held

    train, held = split(records)
    print(f"data: {len(train)} train / {len(held)} held-out records, {sum(len(r['tokens']) for r in train)} train tokens")
    target_model = load_model(target, dtype="float32").model
    eos = target_model.config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    if init_from is not None:
        from specserve.drafter.feature_model import feature_draft_from_token_draft
        from specserve.drafter.model import load_drafter

        model = feature_draft_from_token_draft(load_drafter(init_from))
        vocab_ids = model.vocab_ids
    else:
        vocab_ids = state["vocab_ids"] if state else choose_vocab(train, vocab_size, eos)  # [V_out]
        model = build_feature_draft(target_model, vocab_ids)
    del target_model
    index_of = torch.full((model.embed_tokens.weight.shape[0],), -1, dtype=torch.long)  # token id -> head index
    index_of[vocab_ids] = torch.arange(len(vocab_ids))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    step = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, rng = state["step"], state["rng"]
        print(f"resumed from {ckpt} at step {step}")
    held_batches = [collate([held[i] for i in b], index_of) for b in make_batches(held, tokens_per_batch, random.Random(0))]

    def evaluate() -> tuple[float, float, float]:
        model.eval()
        with torch.no_grad():
            results = [batch_loss(model, b, hard_weight, feature_weight, True, 0.0) for b in held_batches]
        model.train()
        return tuple(sum(float(r[i]) for r in results) / len(results) for i in range(3))

    print("held-out loss %.3f agree %.3f agree(fed back) %.3f (initial)" % evaluate())
    model.train()
    queue: list[list[int]] = []
    bar = tqdm(total=steps, initial=step, desc="train", unit="step")
    while step < steps:
        if not queue:  # a new epoch; pick up shards extracted since
            train, _ = split(load_all())
            queue = make_batches(train, tokens_per_batch, rng)
            tqdm.write(f"epoch: {len(train)} records, {sum(len(r['tokens']) for r in train)} tokens")
        batch = collate([train[i] for i in queue.pop()], index_of)
        loss, agree1, agree2 = batch_loss(model, batch, hard_weight, feature_weight, unroll, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree1.item():.3f}", fed=f"{agree2.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if step % save_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                        "rng": rng, "vocab_ids": vocab_ids, "held": held_keys}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").rename(ckpt)
        if step % (save_every * 4) == 0 and step < steps:
            tqdm.write("step %d held-out loss %.3f agree %.3f agree(fed back) %.3f" % (step, *evaluate()))
            save_feature_draft(model, out_dir, target_spec=target, extra={"training": {"steps": step, "partial": True}})
    bar.close()
    held_loss, held_agree, held_fed = evaluate()
    print(f"final held-out loss {held_loss:.3f} agree {held_agree:.3f} agree(fed back) {held_fed:.3f}")
    extra = {"training": {
        "recipe": "feature draft: target hidden states + greedy self-distillation responses",
        "steps": steps, "seed": seed, "vocab_out": len(vocab_ids), "init_from": None if init_from is None else str(init_from), "train_records": len(train),
        "train_tokens": sum(len(r["tokens"]) for r in train), "tokens_per_batch": tokens_per_batch, "lr": lr,
        "hard_weight": hard_weight, "feature_weight": feature_weight, "unroll": unroll, "noise": noise,
        "held_out_loss": round(held_loss, 4), "held_out_top1_agreement": round(held_agree, 4),
        "held_out_top1_agreement_fed_back": round(held_fed, 4), "wall_time_s_this_run": round(time.time() - began)}}
    save_feature_draft(model, out_dir, target_spec=target, extra=extra)
    print(json.dumps(extra))
    return Path(out_dir)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="specserve/drafts/smollm2-135m-feature-draft", help="drafter directory to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="self-distillation shards, generated when missing (default: draft-data in the specserve cache)")
    parser.add_argument("--features-dir", default=None, help="the target's hidden states per shard (default: next to data-dir)")
    parser.add_argument("--work-dir", default=None, help="checkpoints (default: next to data-dir)")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokens covered by the draft's head")
    parser.add_argument("--prompts", type=int, default=2048, help="synthetic prompts the data is drawn from")
    parser.add_argument("--gen-shards", default=None, help="generate exactly these batches of 24 prompts, comma-separated")
    parser.add_argument("--gen-batches", type=int, default=None, help="or this many batches (default: all)")
    parser.add_argument("--max-new", type=int, default=192)
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--no-unroll", action="store_true", help="skip the pass that feeds predicted states back")
    parser.add_argument("--noise", type=float, default=0.05, help="Gaussian noise on input states while training")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", default="specserve/drafts/smollm2-135m-draft",
                        help="start from this token drafter (layers, norm, head); '' starts from the target's last layer")


def run(args) -> int:
    """Generate (if needed) -> the target's hidden states (if needed) -> train."""
    from specserve.drafter.data import generate_data
    from specserve.drafter.features import extract_features
    from specserve.runtime.models import cache_root

    data_dir = Path(args.data_dir) if args.data_dir else cache_root() / "draft-data"
    features_dir = Path(args.features_dir) if args.features_dir else data_dir.parent / "draft-features"
    work_dir = Path(args.work_dir) if args.work_dir else data_dir.parent / "feature-draft-train"
    shards = [int(x) for x in args.gen_shards.split(",")] if args.gen_shards else None
    generate_data(data_dir, args.prompts, max_new=args.max_new, seed=args.seed, target=args.target,
                  max_batches=args.gen_batches, shards=shards, threads=args.threads)
    extract_features(data_dir, features_dir, target=args.target, threads=args.threads)
    train_feature_draft(args.out, [features_dir], work_dir, steps=args.steps, seed=args.seed, target=args.target,
                        vocab_size=args.vocab_size, tokens_per_batch=args.tokens_per_batch, lr=args.lr,
                        hard_weight=args.hard_weight, feature_weight=args.feature_weight, unroll=not args.no_unroll,
                        noise=args.noise, save_every=args.save_every, threads=args.threads, init_from=args.init_from or None)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="specserve train-draft", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
