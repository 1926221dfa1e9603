"""Token trees: several candidate continuations verified in one forward pass.

A tree hangs off the pending token (the root, the last generated token that is not
yet in the target's cache). Node i holds `tokens[i]` and its parent `parents[i]`
(-1: the root); parents come before their children. The target reads the root and
every node at once; each position attends to the cache, the root and its own
ancestors only (`ancestor_mask`), and sits at position `committed + depth`. Greedy
verification walks down from the root while some child is the target's argmax.
A chain is the tree whose node i has parent i - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.core.acceptance import Verdict


@dataclass(frozen=True)
class DraftTree:
    tokens: list[int]  # [n] node tokens
    parents: list[int]  # [n] parent node index, -1 for a child of the root; parents[i] < i

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"a tree needs one parent per token: {len(self.tokens)} tokens, {len(self.parents)} parents")
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise ValueError(f"node {i}: parent {parent} must be -1 or an earlier node")

    @staticmethod
    def chain(tokens: list[int]) -> DraftTree:
        return DraftTree(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of every node (a child of the root has depth 1)."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return depth

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node`."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[n+1, n+1] bool over [root, nodes]: entry (i, j) is True when j is i or one of i's ancestors."""
    n = len(tree)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True  # the root is everyone's ancestor
    for i, parent in enumerate(tree.parents):
        row = i + 1
        mask[row, row] = True
        if parent >= 0:
            mask[row] |= mask[parent + 1]
    return mask


def accept_greedy_tree(target_logits: torch.Tensor, tree: DraftTree) -> tuple[Verdict, list[int]]:
    """Greedy verification of a tree.

    target_logits: [n+1, V]; row 0 scores the position after the root, row i+1 the
    position after node i. Returns the verdict (accepted path tokens, then the
    target's token after it) and the accepted node indices, root to leaf.
    """
    choices = torch.argmax(target_logits, dim=-1).tolist()  # [n+1]
    children: dict[int, dict[int, int]] = {}
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        children.setdefault(parent, {}).setdefault(token, i)  # a duplicate sibling never wins
    path: list[int] = []
    current = -1
    while True:
        choice = choices[current + 1]
        nxt = children.get(current, {}).get(choice)
        if nxt is None:
            return Verdict(len(path), [tree.tokens[i] for i in path] + [choice]), path
        path.append(nxt)
        current = nxt
