"""In-process adapters: the core loop driving workers directly, with no gRPC.

Used by the in-process engine (the benchmark's "no network" baseline) and by
tests of the loop itself.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from specserve.core.acceptance import Verdict
from specserve.core.distributions import to_dense
from specserve.core.outcomes import Outcome, OutcomeRequest, Speculation
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DraftSequenceTracker, Proposal
from specserve.core.tree import TreeShape, split_tree
from specserve.runtime.ahead import branch_op, speculate_op
from specserve.runtime.engine import Engine, run_alone
from specserve.runtime.workers import DraftWorker, FeatureDraftWorker, TargetWorker


class LocalTargetSession:
    def __init__(self, loaded: Engine):
        self.worker = TargetWorker(loaded)
        self.last_compute_ms = 0.0

    @property
    def last_hidden_states(self) -> torch.Tensor | None:
        return self.worker.last_hidden_states  # [n, H] of the last call, when asked for at start

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False) -> int:
        return self.worker.start(prompt, sampling, seed, return_hidden_states)

    async def verify(self, committed_len: int, tokens: list[int], draft_probs, parents: list[int] | None = None) -> Verdict:
        began = time.perf_counter()
        if parents:
            verdict = self.worker.verify_tree(committed_len, *split_tree(tokens, parents))
        else:
            dense = to_dense(draft_probs, self.worker.loaded.vocab_size) if draft_probs else None  # [k, V]
            verdict = self.worker.verify(committed_len, tokens, dense)
        self.last_compute_ms = (time.perf_counter() - began) * 1e3
        return verdict

    async def lookahead(self, committed_len: int, pending: int, levels: list[list[int]],
                        candidates: list[list[int]]) -> tuple[Verdict, list[int]]:
        from specserve.runtime.lookahead_worker import lookahead_step

        began = time.perf_counter()
        result = lookahead_step(self.worker, committed_len, pending, levels, candidates)
        self.last_compute_ms = (time.perf_counter() - began) * 1e3
        return result.verdict, result.next_level


class LocalDraftProposer:
    def __init__(self, loaded: Engine):
        self.worker = DraftWorker(loaded)
        self.tracker = DraftSequenceTracker()
        self.last_compute_ms = 0.0

    @property
    def forward_passes(self) -> int:
        return self.worker.forward_passes

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        self.worker.start(prompt, sampling, seed)
        self.tracker.reset(prompt)

    async def propose(self, sequence: list[int], k: int) -> Proposal:
        began = time.perf_counter()
        committed, append = self.tracker.diff(sequence)
        tokens, rows = self.worker.propose(committed, append, k)
        self.tracker.record(sequence, tokens)
        self.last_compute_ms = (time.perf_counter() - began) * 1e3
        return Proposal(tokens, rows)

    async def speculate(self, sequence: list[int], proposal: Proposal, outcomes: list[OutcomeRequest], k: int) -> Speculation:
        """Drafting ahead (draft_service's speculate op), its outcomes one after another."""
        began = time.perf_counter()
        drafted = sequence + proposal.tokens
        committed, append = self.tracker.diff(drafted)
        asked = [(o.accepted, o.guesses) for o in outcomes]
        branches = run_alone(speculate_op(self.worker, committed, append, len(proposal.tokens), asked, k))
        for branch in branches:
            if not branch.drafted:
                run_alone(branch_op(self.worker, branch, k))
        self.tracker.record_ahead(sequence, self.worker.held)
        self.last_compute_ms = (time.perf_counter() - began) * 1e3
        found = [Outcome(b.accepted, b.token, b.context_len, Proposal(b.proposal)) for b in branches]
        return Speculation(found, self.last_compute_ms)


class LocalFeatureDraftProposer:
    """A feature draft: each propose sends the tokens since the last one with the
    target's hidden states observed since then (one row per token).

    With a tree shape (nodes > 0), greedy requests get trees of depth k in that shape;
    sampled requests, and every request without a shape, get chains."""

    needs_target_hidden_states = True

    def __init__(self, loaded: Engine, tree: TreeShape | None = None):
        self.worker = FeatureDraftWorker(loaded)
        self.tracker = DraftSequenceTracker()
        self.pending: list[torch.Tensor] = []  # [n_i, H] each, not yet sent
        self.last_compute_ms = 0.0
        self.tree = tree if tree is not None and tree.nodes > 0 else None
        self.drafts_trees = False  # decided per request, at start

    @property
    def forward_passes(self) -> int:
        return self.worker.forward_passes

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        self.worker.start(prompt, sampling, seed)
        self.tracker.reset(prompt[:1])  # the rest of the prompt arrives with the target's hidden states
        self.drafts_trees = self.tree is not None and sampling.greedy

    def observe_target_hidden_states(self, hidden: torch.Tensor) -> None:
        self.pending.append(hidden)

    async def propose(self, sequence: list[int], k: int, nodes: int | None = None) -> Proposal:
        began = time.perf_counter()
        committed, append = self.tracker.diff(sequence)
        hidden = torch.cat(self.pending)  # [len(append), H]
        self.pending = []
        if self.drafts_trees:
            tree = self.worker.propose_tree(committed, append, hidden, dataclasses.replace(self.tree, depth=k, nodes=nodes or self.tree.nodes))
            proposal = Proposal(tree.tokens, None, tree.parents)
        else:
            tokens, rows = self.worker.propose(committed, append, k, hidden)
            proposal = Proposal(tokens, rows)
        self.tracker.record(sequence, [])  # proposals are not kept
        self.last_compute_ms = (time.perf_counter() - began) * 1e3
        return proposal


def local_draft_proposer(loaded: Engine, tree: TreeShape | None = None) -> LocalDraftProposer | LocalFeatureDraftProposer:
    """The in-process proposer for a loaded draft: a feature draft reads the target's hidden
    states (and drafts trees of the given shape for greedy requests); a token draft, chains."""
    return LocalFeatureDraftProposer(loaded, tree) if loaded.needs_target_hidden_states else LocalDraftProposer(loaded)
