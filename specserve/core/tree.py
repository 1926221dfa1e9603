"""Token trees: several candidate continuations verified in one forward pass.

A tree hangs off the pending token (the root, the last generated token that is not
yet in the target's cache). Node i holds `tokens[i]` and its parent `parents[i]`
(-1: the root); parents come before their children. The target reads the root and
every node at once; each position attends to the cache, the root and its own
ancestors only (`ancestor_mask`), and sits at position `committed + depth`. Greedy
verification walks down from the root while some child is the target's argmax.
A chain is the tree whose node i has parent i - 1.

On the wire a tree travels as the node tokens and a parallel `parents` list
(`split_tree` checks it); a feature draft grows one to a `TreeShape`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.core.acceptance import Verdict
from specserve.core.errors import InvalidArgument

# The most nodes a tree may have, and the most nodes a level may expand (width) or a
# node may branch into: what a service accepts from the network. (EAGLE-2 verifies 60.)
MAX_TREE_NODES = 64


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

    @property
    def depth(self) -> int:
        """The longest path: the most nodes one verification can accept (0 for no nodes)."""
        return max(self.depths(), default=0)

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


@dataclass(frozen=True)
class TreeShape:
    """How a feature draft grows a tree: `depth` levels, the `width` likeliest nodes of a
    level expanded into their `branch` likeliest children, the `nodes` likeliest kept.
    The decoding loop sets depth to the step's speculation length K."""

    depth: int = 5
    width: int = 4
    branch: int = 4
    nodes: int = 16

    def check(self, field: str = "tree") -> None:
        """InvalidArgument naming `field.<member>` when a value is out of range."""
        if self.depth < 1:
            raise InvalidArgument(f"{field}.depth: must be at least 1, got {self.depth}")
        for name in ("width", "branch", "nodes"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_TREE_NODES:
                raise InvalidArgument(f"{field}.{name}: must be in [1, {MAX_TREE_NODES}], got {value}")


def split_tree(token_ids: list[int], parents: list[int]) -> tuple[int, DraftTree]:
    """A verify op's tree from the wire: token_ids = [pending, n1..nn], parents [n].
    (pending token, tree); InvalidArgument naming the field at fault."""
    if not token_ids:
        raise InvalidArgument("token_ids: must hold at least the pending token")
    if len(parents) != len(token_ids) - 1:
        raise InvalidArgument(f"parents: one per tree node (token_ids after the pending token): "
                              f"{len(parents)} parents for {len(token_ids) - 1} nodes")
    if len(parents) > MAX_TREE_NODES:
        raise InvalidArgument(f"parents: a tree has at most {MAX_TREE_NODES} nodes, got {len(parents)}")
    try:
        return token_ids[0], DraftTree(list(token_ids[1:]), list(parents))
    except ValueError as error:
        raise InvalidArgument(f"parents: {error}") from None


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


def merge_chain(tree: DraftTree, chain: list[int]) -> DraftTree:
    """The tree with `chain` (a continuation of the root) added as one more branch;
    the part of the chain the tree already holds reuses its nodes."""
    tokens, parents = list(tree.tokens), list(tree.parents)
    child: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for i, (token, parent) in enumerate(zip(tokens, parents)):
        child.setdefault((parent, token), i)
    parent = -1
    for token in chain:
        node = child.get((parent, token))
        if node is None:
            tokens.append(token)
            parents.append(parent)
            node = child[(parent, token)] = len(tokens) - 1
        parent = node
    return DraftTree(tokens, parents)
