"""Medusa trees from `medusa_choices`, and typical acceptance.

A Medusa tree is given by its paths: each choice is a tuple of top-k indices, one
per head, e.g. (0, 1) = "head 0's best token, then head 1's second best after
it". The tree holds every choice as one node (its token: head len(c)-1's
c[-1]-th best), whose parent is the choice without its last index. The
structure does not depend on the tokens, so it is built once into buffers
(`MedusaTree`): parents, depths, the ancestor mask and, per node, the head and
rank that fill it. Each step then only looks up the heads' top-k tokens.

Typical acceptance (Medusa, Cai et al. 2024) accepts a candidate token x where
the target's distribution p gives p(x) > min(posterior_threshold,
posterior_alpha * exp(-H(p))). It accepts more than rejection sampling and its
output is *not* distributed as the target's: it is lossy, opt-in per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specserve.core.errors import InvalidArgument
from specserve.core.tree import MAX_TREE_NODES, DraftTree, ancestor_mask

# The largest top-k index a choice may name.
MAX_CHOICE_RANK = 32
# Typical acceptance's defaults (the Medusa paper's): epsilon and delta.
POSTERIOR_THRESHOLD = 0.09
POSTERIOR_ALPHA = 0.3

# The default tree for 4 heads (10 nodes), chosen by measurement with the shipped heads on
# held-out self-distillation text (`python -m specserve.bench.medusa_trees`): nodes added
# greedily by how much expected accepted length each adds, cut where the next ones add
# under 2% each (on this CPU a verified token costs more than that in fp32).
# See specserve/drafts/smollm2-135m-medusa/CARD.md.
DEFAULT_MEDUSA_CHOICES: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (0, 0), (2,), (0, 0, 0), (3,), (6,), (0, 0, 0, 0), (5,), (0, 1),
)


def default_choices(num_heads: int) -> list[tuple[int, ...]]:
    """The default tree cut to the heads there are."""
    return [c for c in DEFAULT_MEDUSA_CHOICES if len(c) <= num_heads]


@dataclass(frozen=True)
class MedusaTree:
    """A tree's structure from its choices, nodes ordered by depth then choice."""

    choices: tuple[tuple[int, ...], ...]
    parents: tuple[int, ...]  # [n] parent node, -1 for a child of the root
    heads: tuple[int, ...]  # [n] the head that proposes node i (its depth - 1)
    ranks: tuple[int, ...]  # [n] the top-k index of that head
    mask: torch.Tensor  # [n+1, n+1] bool over [root, nodes] (core.tree.ancestor_mask)

    @property
    def depth(self) -> int:
        return max((len(c) for c in self.choices), default=0)

    def top_k(self, head: int) -> int:
        """How many of a head's best tokens the tree reads (0 if none)."""
        return 1 + max((r for h, r in zip(self.heads, self.ranks) if h == head), default=-1)

    def fill(self, top_tokens: Sequence[Sequence[int]]) -> DraftTree:
        """The tree with tokens: top_tokens[head][rank] is a head's rank-th best token."""
        return DraftTree([int(top_tokens[h][r]) for h, r in zip(self.heads, self.ranks)], list(self.parents))

    def pruned(self, depth: int) -> MedusaTree:
        """The tree cut to `depth` levels (a step near the token budget)."""
        if depth >= self.depth:
            return self
        return build_medusa_tree([c for c in self.choices if len(c) <= depth], self.depth)


def build_medusa_tree(choices: Sequence[Sequence[int]], num_heads: int, field: str = "medusa_choices") -> MedusaTree:
    """Validates choices (InvalidArgument naming `field`) and builds the tree's buffers.

    Every choice is a non-empty list of ranks in [0, MAX_CHOICE_RANK), at most one per
    head; choices are distinct, every prefix of a choice is itself a choice, and there
    are at most MAX_TREE_NODES of them.
    """
    paths = [tuple(int(r) for r in c) for c in choices]
    if not paths:
        raise InvalidArgument(f"{field}: at least one path is needed")
    if len(paths) > MAX_TREE_NODES:
        raise InvalidArgument(f"{field}: at most {MAX_TREE_NODES} paths (tree nodes), got {len(paths)}")
    for i, path in enumerate(paths):
        if not path:
            raise InvalidArgument(f"{field}[{i}]: a path must name at least one rank")
        if len(path) > num_heads:
            raise InvalidArgument(f"{field}[{i}]: path {list(path)} is longer than the {num_heads} heads")
        if any(not 0 <= r < MAX_CHOICE_RANK for r in path):
            raise InvalidArgument(f"{field}[{i}]: ranks must be in [0, {MAX_CHOICE_RANK}), got {list(path)}")
    if len(set(paths)) != len(paths):
        raise InvalidArgument(f"{field}: paths must be distinct")
    known = set(paths)
    for i, path in enumerate(paths):
        if len(path) > 1 and path[:-1] not in known:
            raise InvalidArgument(f"{field}[{i}]: path {list(path)} needs its prefix {list(path[:-1])} as a path too")
    ordered = tuple(sorted(paths, key=lambda c: (len(c), c)))
    index = {c: i for i, c in enumerate(ordered)}
    parents = tuple(index[c[:-1]] if len(c) > 1 else -1 for c in ordered)
    heads = tuple(len(c) - 1 for c in ordered)
    ranks = tuple(c[-1] for c in ordered)
    mask = ancestor_mask(DraftTree([0] * len(ordered), list(parents)))
    return MedusaTree(ordered, parents, heads, ranks, mask)


def typical_threshold(probs: torch.Tensor, posterior_threshold: float, posterior_alpha: float) -> torch.Tensor:
    """probs [..., V] -> the probability a token needs to be accepted, [...]."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [...]
    return torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))


def accept_typical_tree(target_probs: torch.Tensor, tree: DraftTree, posterior_threshold: float = POSTERIOR_THRESHOLD,
                        posterior_alpha: float = POSTERIOR_ALPHA) -> list[int]:
    """The longest path of nodes the target accepts typically (the first such path in node
    order on ties). target_probs [n+1, V]: row 0 after the root, row i+1 after node i.
    Returns the accepted node indices, root to leaf (maybe empty)."""
    needed = typical_threshold(target_probs, posterior_threshold, posterior_alpha)  # [n+1]
    tokens = torch.tensor(tree.tokens, dtype=torch.long)
    rows = torch.tensor([p + 1 for p in tree.parents], dtype=torch.long)  # the row that scores node i
    ok = (target_probs[rows, tokens] > needed[rows]).tolist() if len(tree) else []  # [n]
    best: list[int] = []
    accepted_path: dict[int, list[int]] = {-1: []}
    for i, parent in enumerate(tree.parents):  # parents come first, so paths grow in order
        if ok[i] and parent in accepted_path:
            accepted_path[i] = accepted_path[parent] + [i]
            if len(accepted_path[i]) > len(best):
                best = accepted_path[i]
    return best
