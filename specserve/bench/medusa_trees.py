"""Choose a Medusa tree by measurement: `python -m specserve.bench.medusa_trees HEADS HELD_OUT`.

On held-out self-distillation positions (the target's own greedy text, with its
last hidden state h[i] at every position; written by train-medusa as
`held_out.pt`), the heads' ranked guesses are compared with the tokens that
really followed. A tree's expected accepted length per step is the sum, over its
nodes, of the fraction of positions where the node's whole path was right: so
tau = 1 + that sum is what greedy verification of that tree would reach on this
text. Nodes are added greedily (the one adding the most, among those whose
prefix is in), and tau is printed for every size, with the expected tokens per
unit of verify cost when a cost per verified token count is given.
"""

from __future__ import annotations

import argparse
import json

import torch

from specserve.drafter.medusa import load_medusa


@torch.no_grad()
def path_hits(heads, hidden: torch.Tensor, truth: torch.Tensor, max_rank: int, chunk: int = 2048) -> torch.Tensor:
    """rank_of [N, K]: the rank (< max_rank) of the true token among head k's guesses at each
    position, max_rank when it is not among them or past the end."""
    ranks = []
    for start in range(0, len(hidden), chunk):
        logits = heads(hidden[start:start + chunk].float())  # [K, c, V_out]
        top = heads.to_token_ids(logits.topk(max_rank, dim=-1).indices)  # [K, c, R]
        t = truth[start:start + chunk].T  # [K, c]
        match = top == t[..., None]  # [K, c, R]
        rank = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(t, max_rank))  # [K, c]
        ranks.append(rank.T)
    return torch.cat(ranks)  # [N, K]


def grow_tree(rank_of: torch.Tensor, max_nodes: int, max_rank: int) -> list[tuple[tuple[int, ...], float]]:
    """Greedy: (choice, its hit rate) in the order added, up to max_nodes."""
    n, depth = rank_of.shape
    chosen: list[tuple[tuple[int, ...], float]] = []
    alive = {(): torch.ones(n, dtype=torch.bool)}  # path -> positions where the whole path is right
    frontier = {(r,) for r in range(max_rank)}
    while len(chosen) < max_nodes and frontier:
        best, best_rate, best_mask = None, -1.0, None
        for path in frontier:
            d = len(path) - 1
            mask = alive[path[:-1]] & (rank_of[:, d] == path[-1])
            rate = float(mask.float().mean())
            if rate > best_rate or (rate == best_rate and path < best):
                best, best_rate, best_mask = path, rate, mask
        chosen.append((best, best_rate))
        alive[best] = best_mask
        frontier.discard(best)
        if len(best) < depth:
            frontier |= {best + (r,) for r in range(max_rank)}
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("heads", help="a Medusa checkpoint directory")
    ap.add_argument("held_out", help="held_out.pt from train-medusa (hidden [N, H], tokens [N, K])")
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--max-rank", type=int, default=8)
    ap.add_argument("--cost", default=None,
                    help="verify cost (ms) at verified-token counts, e.g. '1:36.6,5:59.5,17:79.3' (interpolated)")
    args = ap.parse_args(argv)
    heads, _ = load_medusa(args.heads)
    data = torch.load(args.held_out, weights_only=False)
    rank_of = path_hits(heads, data["hidden"], data["tokens"][:, :heads.num_heads], args.max_rank)
    chosen = grow_tree(rank_of, args.max_nodes, args.max_rank)
    cost = None
    if args.cost:
        points = sorted((int(k), float(v)) for k, v in (p.split(":") for p in args.cost.split(",")))
        cost = lambda m: _interp(points, m)  # noqa: E731
    tau = 1.0
    print(f"{len(rank_of)} held-out positions; chain of top-1 guesses: tau "
          f"{1 + sum(float((rank_of[:, :d + 1] == 0).all(-1).float().mean()) for d in range(heads.num_heads)):.3f}")
    for i, (path, rate) in enumerate(chosen, 1):
        tau += rate
        extra = f"  tau/cost(1 + nodes) {tau / cost(i + 1) * cost(1):.3f}" if cost else ""
        print(f"{i:3d} nodes  tau {tau:.3f}  +{list(path)} ({rate:.3f}){extra}")
    print(json.dumps([list(p) for p, _ in chosen]))
    return 0


def _interp(points: list[tuple[int, float]], m: int) -> float:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= m <= x1:
            return y0 + (y1 - y0) * (m - x0) / (x1 - x0)
    return points[-1][1] if m > points[-1][0] else points[0][1]


if __name__ == "__main__":
    raise SystemExit(main())
