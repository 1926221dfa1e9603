"""Train Medusa-1 heads (medusa.py) on the frozen target: `specserve train-medusa`.

Data is self-distillation: the target's own greedy answers to synthetic prompts
(drafter/prompts.py, nothing from the benchmark sets), generated in batches
(drafter/data.py). A forward hook on the target's final norm records the last
hidden state of every generated position while it generates, so no second pass
is needed: for response r[0..n-1], h[i] is the state whose LM head gave r[i], and
head k learns r[i + 1 + k] from h[i] (hard label) and the target's own top-k
distribution at that position (soft label). Loss: sum over heads of
decay^k x (soft cross-entropy + hard_weight x hard cross-entropy).
AdamW, warmup + cosine, fp32, resumable checkpoints, fixed seed. The report
gives each head's top-1 / top-5 accuracy on held-out records.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from specserve.drafter.medusa import MedusaHeads, save_medusa


class NormRecorder:
    """Forward hook on the final norm: the last position's output of every call, [B, H] each."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, module, inputs, output) -> None:
        self.steps.append(output[:, -1].to(torch.bfloat16))


def generate_medusa_data(out_dir: str | Path, n_prompts: int, batch_size: int, max_new: int, seed: int, target: str,
                         dtype: str, threads: int, time_budget_s: float | None, topk: int = 8) -> Path:
    """Shards out_dir/shard_XXXXX.pt of records {prompt, response, hidden [n, H], top_ids, top_lp}."""
    from specserve.drafter.data import chat_ids, generate_batch
    from specserve.drafter.prompts import make_prompts
    from specserve.runtime.models import load_model, load_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(target)
    loaded = load_model(target, dtype=dtype)
    prompts = [chat_ids(tokenizer, p) for p in make_prompts(n_prompts, seed)]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # little padding per batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(loaded.eos_token_ids)
    began, tokens = time.time(), 0
    bar = tqdm(perm, desc="generate", unit="batch")
    for shard in bar:
        path = out_dir / f"shard_{shard:05d}.pt"
        if path.exists():
            continue
        if time_budget_s is not None and time.time() - began > time_budget_s:
            break
        recorder = NormRecorder()
        hook = loaded.model.model.norm.register_forward_hook(recorder)
        try:
            records = generate_batch(loaded.model, [prompts[i] for i in batches[shard]], pad_id,
                                     set(loaded.eos_token_ids), max_new, topk)
        finally:
            hook.remove()
        hidden = torch.stack(recorder.steps, dim=1)  # [B, steps, H]
        for b, record in enumerate(records):
            record["hidden"] = hidden[b, :len(record["response"])].clone()  # [n, H]
        torch.save(records, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        tokens += sum(len(r["response"]) for r in records)
        bar.set_postfix(tok=tokens, tok_s=f"{tokens / (time.time() - began):.1f}")
    return out_dir


def load_records(data_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(data_dir).glob("shard_*.pt")):
        records.extend(r for r in torch.load(path, weights_only=False) if len(r["response"]) >= 2)
    return records


def choose_vocab(records: list[dict], size: int) -> torch.Tensor:
    """The `size` tokens the target emits (then ranks second..) most often, sorted: [V_out]."""
    counts = Counter(t for r in records for t in r["response"])
    alternatives = Counter(torch.cat([r["top_ids"][:, 1:].flatten() for r in records]).tolist())
    ranked = sorted(set(counts) | set(alternatives), key=lambda t: (-counts.get(t, 0), -alternatives.get(t, 0), t))
    return torch.tensor(sorted(ranked[:size]), dtype=torch.long)


def flatten(records: list[dict], num_heads: int, index_of: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every position i with its state and, per head k, the label at i + 1 + k (-1: past the end or
    outside the head's vocabulary). hidden [N, H]; hard [N, K]; soft_idx [N, K, k]; soft_lp [N, K, k];
    tokens [N, K] (the true token ids, -1 past the end)."""
    hidden, hard, soft_idx, soft_lp, tokens = [], [], [], [], []
    for r in records:
        n = len(r["response"])
        response = torch.tensor(r["response"])
        hidden.append(r["hidden"][:n - 1])
        heads_tok, heads_idx, heads_lp = [], [], []
        for k in range(num_heads):
            j = torch.arange(n - 1) + 1 + k  # [n-1]
            inside = j < n
            jc = j.clamp(max=n - 1)
            heads_tok.append(torch.where(inside, response[jc], -1))
            idx = index_of[r["top_ids"][jc].long()]  # [n-1, k]
            heads_idx.append(torch.where(inside[:, None], idx, -1))
            heads_lp.append(r["top_lp"][jc].float())
        tokens.append(torch.stack(heads_tok, 1))
        soft_idx.append(torch.stack(heads_idx, 1))
        soft_lp.append(torch.stack(heads_lp, 1))
    tokens_t = torch.cat(tokens)  # [N, K]
    return {"hidden": torch.cat(hidden), "tokens": tokens_t, "hard": torch.where(tokens_t >= 0, index_of[tokens_t.clamp(min=0)], -1),
            "soft_idx": torch.cat(soft_idx), "soft_lp": torch.cat(soft_lp)}


def heads_loss(heads: MedusaHeads, batch: dict, hard_weight: float, decay: float) -> tuple[torch.Tensor, list[float]]:
    """(loss, top-1 agreement per head) for a batch of positions."""
    logits = heads(batch["hidden"].float())  # [K, B, V_out]
    total = torch.zeros(())
    agree = []
    for k in range(heads.num_heads):
        logq = torch.log_softmax(logits[k], dim=-1)  # [B, V_out]
        idx, lp, hard = batch["soft_idx"][:, k], batch["soft_lp"][:, k], batch["hard"][:, k]
        inside = idx >= 0  # [B, k]
        p = torch.softmax(lp.masked_fill(~inside, -1e4), dim=-1) * inside
        has = inside.any(-1)
        soft = -(p * logq.gather(1, idx.clamp(min=0))).sum(-1)[has].mean() if has.any() else torch.zeros(())
        ok = hard >= 0
        hard_ce = -logq[ok].gather(1, hard[ok][:, None]).mean() if ok.any() else torch.zeros(())
        total = total + decay ** k * (soft + hard_weight * hard_ce)
        agree.append(float((logq.argmax(-1)[ok] == hard[ok]).float().mean()) if ok.any() else 0.0)
    return total, agree


@torch.no_grad()
def head_accuracy(heads: MedusaHeads, data: dict, topk: int = 5, chunk: int = 2048) -> list[dict]:
    """Per head: top-1 and top-`topk` accuracy against the target's token (over the full vocabulary)."""
    hits1 = torch.zeros(heads.num_heads)
    hitsk = torch.zeros(heads.num_heads)
    count = torch.zeros(heads.num_heads)
    for start in range(0, len(data["hidden"]), chunk):
        logits = heads(data["hidden"][start:start + chunk].float())  # [K, c, V_out]
        top = heads.to_token_ids(logits.topk(topk, dim=-1).indices)  # [K, c, topk]
        truth = data["tokens"][start:start + chunk].T  # [K, c]
        valid = truth >= 0
        hits1 += ((top[..., 0] == truth) & valid).sum(-1)
        hitsk += ((top == truth[..., None]).any(-1) & valid).sum(-1)
        count += valid.sum(-1)
    return [{"head": k, "top1": round(float(hits1[k] / count[k]), 4), f"top{topk}": round(float(hitsk[k] / count[k]), 4),
             "positions": int(count[k])} for k in range(heads.num_heads)]


def train_medusa(out: str | Path, data_dir: Path, work_dir: Path, target: str, num_heads: int, num_layers: int,
                 vocab_size: int, steps: int, batch_positions: int, lr: float, hard_weight: float, decay: float,
                 seed: int, threads: int, save_every: int, held_out: int, command: str) -> dict:
    from specserve.runtime.models import load_model

    began = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    records = load_records(data_dir)
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    held = [records[i] for i in order[:held_out]]
    train = [records[i] for i in order[held_out:]]
    lm_head = load_model(target, dtype="float32").model.lm_head.weight.detach()  # [V, H]
    vocab_ids = choose_vocab(train, vocab_size) if vocab_size and vocab_size < lm_head.shape[0] else None
    index_of = torch.full((lm_head.shape[0],), -1, dtype=torch.long)
    index_of[vocab_ids if vocab_ids is not None else torch.arange(lm_head.shape[0])] = torch.arange(
        vocab_ids.numel() if vocab_ids is not None else lm_head.shape[0])
    heads = MedusaHeads(lm_head.shape[1], len(index_of[index_of >= 0]), num_heads, num_layers, vocab_ids)
    heads.init_from_lm_head(lm_head)
    train_data, held_data = flatten(train, num_heads, index_of), flatten(held, num_heads, index_of)
    n = len(train_data["hidden"])
    print(f"{len(train)} train records, {n} positions; {len(held)} held-out records, {len(held_data['hidden'])} positions")
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / "checkpoint.pt"
    step = 0
    generator = torch.Generator().manual_seed(seed)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        heads.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
        generator.set_state(state["generator"])
        print(f"resumed from {ckpt} at step {step}")
    print("held-out accuracy (initial):", head_accuracy(heads, held_data))
    bar = tqdm(total=steps, initial=step, desc="train-medusa", unit="step")
    while step < steps:
        pick = torch.randint(0, n, (batch_positions,), generator=generator)
        batch = {key: value[pick] for key, value in train_data.items()}
        loss, agree = heads_loss(heads, batch, hard_weight, decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", agree="/".join(f"{a:.2f}" for a in agree))
        if step % save_every == 0 or step == steps:
            torch.save({"model": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                        "generator": generator.get_state()}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").rename(ckpt)
    bar.close()
    accuracy = head_accuracy(heads, held_data)
    report = {"recipe": "Medusa-1 on the frozen target, greedy self-distillation", "command": command, "steps": steps,
              "seed": seed, "num_heads": num_heads, "num_layers": num_layers, "vocab_out": heads.heads[0][-1].out_features,
              "train_records": len(train), "train_positions": n, "held_out_records": len(held),
              "held_out_positions": len(held_data["hidden"]), "batch_positions": batch_positions, "lr": lr,
              "hard_weight": hard_weight, "decay": decay, "held_out_accuracy": accuracy,
              "train_wall_time_s_this_run": round(time.time() - began)}
    torch.save(held_data, work_dir / "held_out.pt")  # for choosing a tree by measurement
    save_medusa(heads, out, base_model=target, extra=report)
    print(json.dumps(report))
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="specserve/drafts/smollm2-135m-medusa", help="checkpoint directory to write")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--data-dir", default=None, help="self-distillation shards with hidden states (default: medusa-data in the specserve cache)")
    parser.add_argument("--work-dir", default=None, help="checkpoints (default: next to data-dir)")
    parser.add_argument("--prompts", type=int, default=4096, help="synthetic prompts the data is drawn from")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts generated per forward pass")
    parser.add_argument("--max-new", type=int, default=192)
    parser.add_argument("--gen-dtype", default="bfloat16", help="the target's dtype while generating")
    parser.add_argument("--gen-minutes", type=float, default=None, help="stop generating after this long (resumable)")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokens a head covers (0: the full vocabulary)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-positions", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--decay", type=float, default=0.8, help="loss weight of head k is decay**k")
    parser.add_argument("--held-out", type=int, default=48, help="records kept out of training for accuracy")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def run(args, command: str = "") -> int:
    import sys

    from specserve.runtime.models import cache_root

    command = command or "specserve train-medusa " + " ".join(sys.argv[2:])
    data_dir = Path(args.data_dir) if args.data_dir else cache_root() / "medusa-data"
    work_dir = Path(args.work_dir) if args.work_dir else data_dir.parent / "medusa-train"
    generate_medusa_data(data_dir, args.prompts, args.batch_size, args.max_new, args.seed, args.target, args.gen_dtype,
                         args.threads, None if args.gen_minutes is None else args.gen_minutes * 60)
    train_medusa(args.out, data_dir, work_dir, args.target, args.num_heads, args.num_layers, args.vocab_size, args.steps,
                 args.batch_positions, args.lr, args.hard_weight, args.decay, args.seed, args.threads, args.save_every,
                 args.held_out, command)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="specserve train-medusa", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv), command="specserve train-medusa " + " ".join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
