"""What a target session and a draft session do, on one model, synchronously.

The services run these in a worker thread; the in-process engine calls them
directly. Token ids arrive unchecked from the network, so they are checked here.
Target and token-draft workers see a model only through the engine interface
(`runtime/engine.py`); the feature draft's worker runs its PyTorch module directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from specserve.core.acceptance import Verdict, accept_greedy, accept_rejection_sampling
from specserve.core.distributions import to_sparse
from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.sampling import SamplingConfig, make_generator, next_token, position_seed, warp
from specserve.core.tree import DraftTree, TreeShape, accept_greedy_tree, ancestor_mask
from specserve.runtime.engine import Engine, EngineSession, Forward, Op, run_alone, tree_fallback_path

if TYPE_CHECKING:
    from specserve.runtime.ahead import Branch

SparseRow = tuple[list[int], list[float]]


class _SessionBase:
    def __init__(self, loaded: Engine):
        self.loaded = loaded
        self.kv = loaded.new_session()
        self.sampling = SamplingConfig()
        self.generator: torch.Generator | None = None
        self.seed = 0
        self.started = False

    def _begin(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        if self.started:
            raise FailedPrecondition("the session has already started")
        if not prompt:
            raise InvalidArgument("prompt_token_ids: must not be empty")
        self._check_tokens(prompt, "prompt_token_ids", 0)
        self.sampling = sampling
        self.seed = seed
        self.generator = make_generator(seed)
        self.started = True

    def reseed(self, position: int) -> None:
        """Draws of the op starting at `position` come from their own stream (core.sampling.position_seed)."""
        if self.generator is not None:
            self.generator.manual_seed(position_seed(self.seed, position))

    def close(self) -> None:
        """Frees the session's cache (the stream ended)."""
        self.kv.close()

    def _check_started(self) -> None:
        if not self.started:
            raise FailedPrecondition("the session has not started: send a start op first")

    def _check_tokens(self, token_ids: list[int], field: str, after: int) -> None:
        bad = [t for t in token_ids if t >= self.loaded.vocab_size]
        if bad:
            raise InvalidArgument(f"{field}: token id {bad[0]} is outside the vocabulary of {self.loaded.vocab_size}")
        if after + len(token_ids) > self.loaded.max_context_tokens:
            raise InvalidArgument(
                f"{field}: {after + len(token_ids)} tokens exceed the context window of {self.loaded.max_context_tokens}"
            )


class TargetWorker(_SessionBase):
    """Prefills, then verifies chains (or trees, greedily): one forward pass per step.

    With `return_hidden_states`, each op also leaves in `last_hidden_states` the
    last hidden state [n, H] of every position it added to the cache (start: the
    prompt's; verify: the pending token's and the accepted proposals'): what a
    feature draft reads.
    """

    def __init__(self, loaded: Engine):
        super().__init__(loaded)
        self.return_hidden_states = False
        self.last_hidden_states: torch.Tensor | None = None

    # Each op comes twice: `x_op` yields its forward passes (a scheduler batches them with
    # other sessions'), `x` runs it alone.
    def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False,
              **options) -> int:
        return run_alone(self.start_op(prompt, sampling, seed, return_hidden_states, **options))

    def verify(self, committed_len: int, token_ids: list[int], draft_probs: torch.Tensor | None) -> Verdict:
        return run_alone(self.verify_op(committed_len, token_ids, draft_probs))

    def verify_tree(self, committed_len: int, pending: int, tree: DraftTree) -> Verdict:
        return run_alone(self.verify_tree_op(committed_len, pending, tree))

    def start_op(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False) -> Op[int]:
        self._begin(prompt, sampling, seed)
        if return_hidden_states and not self.loaded.returns_hidden_states:
            raise InvalidArgument(f"return_hidden_states: the {self.loaded.engine_name} engine does not return hidden "
                                  "states (serve the target on the torch engine for a feature draft)")
        self.return_hidden_states = return_hidden_states
        logits = yield from self._extend_op(prompt, logits_for=1)  # [1, V]
        return next_token(logits[0], self.sampling, self.generator)

    def _extend_op(self, token_ids: list[int], logits_for: int) -> Op[torch.Tensor]:
        logits, hidden = yield Forward(self.kv, token_ids, logits_for=logits_for, hidden=self.return_hidden_states)
        if self.return_hidden_states:
            self.last_hidden_states = hidden  # [n, H]
        return logits

    def verify_op(self, committed_len: int, token_ids: list[int], draft_probs: torch.Tensor | None) -> Op[Verdict]:
        """token_ids = [pending, d1..dk]; draft_probs [k, V] or None (deterministic proposer)."""
        self._check_started()
        if committed_len != self.kv.length:
            raise FailedPrecondition(f"committed_len is {committed_len} but the session holds {self.kv.length} tokens")
        if not token_ids:
            raise InvalidArgument("token_ids: must hold at least the pending token")
        self._check_tokens(token_ids, "token_ids", committed_len)
        proposal = token_ids[1:]
        if draft_probs is not None and draft_probs.shape[0] != len(proposal):
            raise InvalidArgument(f"draft_probs: {draft_probs.shape[0]} distributions for {len(proposal)} proposed tokens")
        logits = yield from self._extend_op(token_ids, logits_for=len(token_ids))  # [k+1, V]
        self.reseed(committed_len)
        if self.sampling.greedy:
            verdict = accept_greedy(logits, proposal)
        else:
            verdict = accept_rejection_sampling(warp(logits, self.sampling), proposal, draft_probs, self.generator)
        # Keep the pending token and the accepted proposals; the last verdict token is the new pending one.
        self.kv.rollback(committed_len + 1 + verdict.accepted)
        if self.return_hidden_states:
            self.last_hidden_states = self.last_hidden_states[: 1 + verdict.accepted]  # [1 + accepted, H]
        return verdict

    def _check_tree_op(self, committed_len: int, pending: int, tree: DraftTree) -> list[int]:
        """Checks a tree verify op against the session; the tokens it feeds: [pending, *nodes]."""
        if committed_len != self.kv.length:
            raise FailedPrecondition(f"committed_len is {committed_len} but the session holds {self.kv.length} tokens")
        token_ids = [pending, *tree.tokens]
        self._check_tokens(token_ids, "token_ids", 0)
        # The context window bounds positions: the tree's deepest node sits at committed_len + depth.
        if committed_len + 1 + tree.depth > self.loaded.max_context_tokens:
            raise InvalidArgument(f"token_ids: a tree of depth {tree.depth} after {committed_len + 1} tokens exceeds "
                                  f"the context window of {self.loaded.max_context_tokens}")
        return token_ids

    def verify_tree_op(self, committed_len: int, pending: int, tree: DraftTree) -> Op[Verdict]:
        """Scores the pending token and every node of a tree in one forward pass (tree attention)
        and keeps the longest path the target agrees with. Greedy decoding only. An engine
        without tree attention verifies the tree's first-listed path as a chain instead."""
        self._check_started()
        if not self.sampling.greedy:
            raise InvalidArgument("parents: a tree is verified greedily only; a sampled request proposes chains")
        token_ids = self._check_tree_op(committed_len, pending, tree)
        if not self.loaded.supports_trees:
            chain = [tree.tokens[i] for i in tree_fallback_path(tree.parents)]
            return (yield from self.verify_op(committed_len, [pending, *chain], None))
        positions = [committed_len + d for d in [0, *tree.depths()]]
        logits, hidden = yield Forward(self.kv, token_ids, logits_for=len(token_ids), hidden=self.return_hidden_states,
                                       positions=positions, visible=ancestor_mask(tree))  # [n+1, V], [n+1, H]
        verdict, path = accept_greedy_tree(logits, tree)
        kept = [0] + [1 + i for i in path]  # the pending token and the accepted nodes
        self.kv.keep(committed_len, kept)
        if self.return_hidden_states:
            self.last_hidden_states = hidden[kept]  # [1 + accepted, H]
        return verdict


class DraftWorker(_SessionBase):
    """Proposes k tokens autoregressively from a small model.

    `held` is the draft's sequence: everything it was sent plus its last proposals.
    The cache holds all of it but the last proposal (never fed back). Greedy sessions
    also keep the logits each position of the last chain drafted was chosen from
    (`scores`, for guesses of the target's tokens there), and may hold `branches`:
    outcomes of a verdict drafted ahead beside the session's own sequence
    (`runtime/ahead.py`); the next op resumes from whichever cache shares most with
    its sequence.
    """

    def __init__(self, loaded: Engine):
        super().__init__(loaded)
        self.held: list[int] = []
        self.forward_passes = 0
        self.scores: dict[int, torch.Tensor] = {}  # position in held -> logits [V_out] it was drafted from
        self.branches: list[Branch] = []  # outcomes drafted ahead, beside `held`

    def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        return run_alone(self.start_op(prompt, sampling, seed))

    def propose(self, committed_len: int, token_ids: list[int], k: int) -> tuple[list[int], list[SparseRow] | None]:
        return run_alone(self.propose_op(committed_len, token_ids, k))

    def start_op(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> Op[None]:
        self._begin(prompt, sampling, seed)
        # The prompt's last token goes in with the first propose call, so its logits are computed then.
        if len(prompt) > 1:
            yield Forward(self.kv, prompt[:-1], logits_for=0)
            self.forward_passes += 1
        self.held = list(prompt)

    def propose_op(self, committed_len: int, token_ids: list[int], k: int) -> Op[tuple[list[int], list[SparseRow] | None]]:
        """Proposals d1..dk and, when sampling, the sparse distribution each was drawn from."""
        self._check_started()
        if k < 1:
            raise InvalidArgument("num_tokens: must be at least 1")
        keep = self.resume(committed_len, token_ids, room=k)
        proposal, rows, self.scores = yield from self.draft_chain_op(self.kv, self.held[keep:], len(self.held), k)
        self.held.extend(proposal)
        return proposal, (None if self.sampling.greedy else rows)

    def resume(self, committed_len: int, token_ids: list[int], room: int) -> int:
        """Makes the sequence held[:committed_len] + token_ids, with `room` more tokens to come,
        from the cache (own or a branch's) that shares most with it; the tokens kept in the cache."""
        if committed_len > len(self.held):
            raise FailedPrecondition(f"committed_len is {committed_len} but the draft holds {len(self.held)} tokens")
        self._check_tokens(token_ids, "token_ids", committed_len)
        if committed_len + len(token_ids) + room > self.loaded.max_context_tokens:
            raise InvalidArgument("num_tokens: the proposals would exceed the draft's context window")
        sequence = self.held[:committed_len] + list(token_ids)
        if not sequence:
            raise InvalidArgument("token_ids: the draft's sequence would be empty")
        common = _common(self.held, sequence, committed_len)
        usable = min(common, self.kv.length)
        chosen = None
        for branch in self.branches:
            shared = _common(branch.held, sequence, min(branch.shared, committed_len))
            if min(shared, branch.kv.length) > usable:
                chosen, common, usable = branch, shared, min(shared, branch.kv.length)
        for branch in self.branches:
            if branch is not chosen:
                branch.kv.close()
        self.branches = []
        if chosen is not None:  # a verdict matched an outcome drafted ahead: continue from its cache
            self.kv.close()
            self.kv, self.scores = chosen.kv, chosen.scores
        # Logits at position p came from the p tokens before it: still right while they are.
        self.scores = {p: logits for p, logits in self.scores.items() if p <= common}
        self.held = sequence
        keep = min(usable, len(sequence) - 1)
        self.kv.rollback(keep)
        return keep

    def draft_chain_op(self, kv: EngineSession, feed: list[int], position: int, k: int
                       ) -> Op[tuple[list[int], list[SparseRow], dict[int, torch.Tensor]]]:
        """Feeds `feed` to `kv`, then draws k tokens, the first at `position` of the sequence:
        (proposal, the sparse rows they were drawn from when sampling, the logits [V_out] each
        position was chosen from when greedy)."""
        logits = (yield Forward(kv, feed))[0][0]  # [V_out]
        self.forward_passes += 1
        self.reseed(len(self.held))
        proposal: list[int] = []
        rows: list[SparseRow] = []
        scores: dict[int, torch.Tensor] = {}
        for i in range(k):
            token, row = _choose(logits, kv.vocab_ids, self.sampling, self.generator)
            proposal.append(token)
            if row is not None:
                rows.append(row)
            else:
                scores[position + i] = logits
            if i < k - 1:
                logits = (yield Forward(kv, [token]))[0][0]  # [V_out]
                self.forward_passes += 1
        return proposal, rows, scores

    def close(self) -> None:
        for branch in self.branches:
            branch.kv.close()
        self.branches = []
        super().close()


RANKED = 5  # likeliest tokens kept per drafted position: up to 4 guesses, plus the proposal a guess must differ from


def ranked_tokens(logits: torch.Tensor, vocab_ids: torch.Tensor | None) -> list[int]:
    """The draft's RANKED likeliest token ids from logits [V_out], likeliest first."""
    indices = torch.topk(logits, min(RANKED, logits.shape[-1])).indices  # [RANKED]
    return (indices if vocab_ids is None else vocab_ids[indices]).tolist()


def _common(a: list[int], b: list[int], start: int) -> int:
    """The length of the common prefix of a and b, given that it is at least `start`."""
    limit = min(len(a), len(b))
    n = min(start, limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class FeatureDraftWorker(_SessionBase):
    """Proposes k tokens from the target's hidden states (a `FeatureDraft`).

    `held` is the token sequence x[0..m] for whose tokens x[1..m] the draft was sent
    the target's hidden state at the position before; its cache holds one pair
    (h[j-1], x[j]) per such token. Proposals are never kept: they were drafted from
    predicted hidden states, so each call rolls the cache back to true pairs.
    Needs the PyTorch engine (its sessions take `Forward.features`).
    """

    def __init__(self, loaded: Engine):
        super().__init__(loaded)
        self.held: list[int] = []
        self.forward_passes = 0
        self.hidden_size = int(loaded.model.config.hidden_size)

    def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        self._begin(prompt, sampling, seed)
        self.held = list(prompt[:1])  # the rest of the prompt arrives with its hidden states

    def propose(self, committed_len: int, token_ids: list[int], k: int, hidden_states: torch.Tensor | None
                ) -> tuple[list[int], list[SparseRow] | None]:
        return run_alone(self.propose_op(committed_len, token_ids, k, hidden_states))

    def propose_tree(self, committed_len: int, token_ids: list[int], hidden_states: torch.Tensor | None,
                     shape: TreeShape) -> DraftTree:
        return run_alone(self.propose_tree_op(committed_len, token_ids, hidden_states, shape))

    def propose_op(self, committed_len: int, token_ids: list[int], k: int, hidden_states: torch.Tensor | None
                   ) -> Op[tuple[list[int], list[SparseRow] | None]]:
        """hidden_states [len(token_ids), H]: the target's state before each new token."""
        self._check_started()
        logits, predicted = yield from self._true_pairs_op(committed_len, token_ids, hidden_states, k)
        self.reseed(committed_len + len(token_ids))
        proposal: list[int] = []
        rows: list[SparseRow] = []
        for i in range(k):
            token, row = _choose(logits, self.kv.vocab_ids, self.sampling, self.generator)
            proposal.append(token)
            if row is not None:
                rows.append(row)
            if i < k - 1:
                logits, predicted = yield from self._forward_op([token], predicted[-1:])
        return proposal, (None if self.sampling.greedy else rows)

    def propose_tree_op(self, committed_len: int, token_ids: list[int], hidden_states: torch.Tensor | None,
                        shape: TreeShape) -> Op[DraftTree]:
        """A tree of candidate continuations, greedy decoding (see `TreeShape`).

        Depth by depth, the `width` most probable nodes (by the draft's probability of the
        whole path) are expanded, each into its `branch` most probable next tokens, in one
        forward pass per depth with tree attention; the tree is the `nodes` most probable
        nodes found (a node is never likelier than its parent, so it comes with its path).
        """
        self._check_started()
        if not self.sampling.greedy:
            raise InvalidArgument("tree: trees are drafted for greedy decoding only")
        logits, predicted = yield from self._true_pairs_op(committed_len, token_ids, hidden_states, shape.depth)
        base = self.kv.length  # pairs in the cache; the root's pair is the last
        nodes: list[_Node] = []
        frontier = self._children(nodes, -1, logits, 0.0, shape.branch)
        fed: list[int] = []  # node index of each speculative cache slot after `base`
        for _ in range(shape.depth - 1):
            frontier = sorted(frontier, key=lambda i: -nodes[i].score)[: shape.width]
            inputs = torch.stack([predicted[-1] if nodes[i].parent < 0 else nodes[nodes[i].parent].feature for i in frontier])  # [f, H]
            slots = {node: slot for slot, node in enumerate(fed + frontier)}
            visible = torch.zeros(len(frontier), len(slots), dtype=torch.bool)  # [f, m]
            for row, i in enumerate(frontier):
                for j in _path(nodes, i):
                    visible[row, slots[j]] = True
            positions = [base - 1 + nodes[i].depth for i in frontier]
            out_logits, out_states = yield Forward(self.kv, [nodes[i].token for i in frontier], logits_for=len(frontier),
                                                   hidden=True, positions=positions, visible=visible,
                                                   features=inputs)  # [f, V_out], [f, H]
            self.forward_passes += 1
            fed += frontier
            children: list[int] = []
            for row, i in enumerate(frontier):
                nodes[i].feature = out_states[row]
                children += self._children(nodes, i, out_logits[row], nodes[i].score, shape.branch)
            frontier = children
        return _select(nodes, shape.nodes)

    def _children(self, nodes: list[_Node], parent: int, logits: torch.Tensor, score: float, branch: int) -> list[int]:
        """Adds the `branch` most probable next tokens after `parent` as nodes; their indices."""
        logp = torch.log_softmax(logits.float(), dim=-1)  # [V_out]
        values, indices = logp.topk(branch)
        vocab_ids = self.kv.vocab_ids
        depth = 1 if parent < 0 else nodes[parent].depth + 1
        added = []
        for value, index in zip(values.tolist(), indices.tolist()):
            token = index if vocab_ids is None else int(vocab_ids[index])
            nodes.append(_Node(token, parent, score + value, depth))
            added.append(len(nodes) - 1)
        return added

    def _true_pairs_op(self, committed_len: int, token_ids: list[int], hidden_states: torch.Tensor | None, k: int
                       ) -> Op[tuple[torch.Tensor, torch.Tensor]]:
        """Checks a propose op, brings the cache up to date with true pairs; (logits [V_out], predicted [n, H])."""
        if not 1 <= committed_len <= len(self.held):
            raise FailedPrecondition(f"committed_len is {committed_len} but the draft holds {len(self.held)} tokens with hidden states")
        if k < 1:
            raise InvalidArgument("num_tokens: must be at least 1")
        if not token_ids:
            raise InvalidArgument("token_ids: a feature draft needs at least one new token with its hidden state")
        if hidden_states is None or tuple(hidden_states.shape) != (len(token_ids), self.hidden_size):
            shape = None if hidden_states is None else tuple(hidden_states.shape)
            raise InvalidArgument(f"hidden_states: expected shape {(len(token_ids), self.hidden_size)} (one row per token), got {shape}")
        self._check_tokens(token_ids, "token_ids", committed_len)
        if committed_len + len(token_ids) + k > self.loaded.max_context_tokens:
            raise InvalidArgument("num_tokens: the proposals would exceed the draft's context window")
        self.held = self.held[:committed_len] + list(token_ids)
        self.kv.rollback(min(self.kv.length, committed_len - 1))  # pairs are one fewer than tokens
        return (yield from self._forward_op(list(token_ids), hidden_states))

    def _forward_op(self, token_ids: list[int], hidden: torch.Tensor) -> Op[tuple[torch.Tensor, torch.Tensor]]:
        """Appends pairs; (float32 logits [V_out] of the last, predicted hidden states [n, H])."""
        logits, predicted = yield Forward(self.kv, token_ids, logits_for=1, hidden=True, features=hidden)  # [1, V_out], [n, H]
        self.forward_passes += 1
        return logits[0], predicted


def _choose(logits: torch.Tensor, vocab_ids: torch.Tensor | None, sampling: SamplingConfig,
            generator: torch.Generator | None) -> tuple[int, SparseRow | None]:
    """The next draft token from logits [V_out] and, when sampling, the sparse row it was drawn from."""
    if sampling.greedy:
        index = int(torch.argmax(logits).item())
        return (index if vocab_ids is None else int(vocab_ids[index])), None
    probs = warp(logits, sampling)  # [V_out]
    index = int(torch.multinomial(probs, 1, generator=generator).item())
    token = index if vocab_ids is None else int(vocab_ids[index])
    return token, to_sparse(probs, vocab_ids)


@dataclass
class _Node:
    token: int
    parent: int  # node index, -1 for a child of the root
    score: float  # log-probability of the path from the root, under the draft
    depth: int
    feature: torch.Tensor | None = None  # [H] the draft's prediction after this node, once expanded


def _path(nodes: list[_Node], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = nodes[node].parent
    return path


def _select(nodes: list[_Node], limit: int) -> DraftTree:
    """The `limit` likeliest nodes with their ancestors, parents before children."""
    ranked = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth))
    chosen: set[int] = set()
    for i in ranked:
        if len(chosen) >= limit:
            break
        chosen.update(_path(nodes, i))
    order = sorted(chosen, key=lambda i: (nodes[i].depth, -nodes[i].score))
    index = {node: position for position, node in enumerate(order)}
    return DraftTree([nodes[i].token for i in order], [index[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in order])
