"""Medusa heads co-located with the target: one forward pass (and one round trip) per step.

The verify pass over [pending, candidates] already computes the target's last
hidden state at every position. After acceptance, the heads read the state at
the last accepted position (the one whose LM head gave the new pending token)
and propose the next step's candidates, which go back with the verdict:

- greedy requests: a tree from `medusa_choices` (core.medusa_tree), verified
  greedily (lossless: the output is the target's own);
- sampled requests: a chain, token i drawn from head i's (warped) distribution,
  verified by rejection sampling against those distributions (lossless), which
  the session keeps, so they never travel;
- sampled requests with typical acceptance (opt-in, lossy): a tree, each node
  accepted when the target gives it p > min(threshold, alpha * exp(-H(p))); the
  next token is then drawn from the target's distribution after the path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.core.acceptance import Verdict
from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.medusa_tree import (POSTERIOR_ALPHA, POSTERIOR_THRESHOLD, MedusaTree, accept_typical_tree,
                                        build_medusa_tree, default_choices)
from specserve.core.sampling import SamplingConfig, sample, warp
from specserve.core.tree import DraftTree, accept_greedy_tree, ancestor_mask
from specserve.drafter.medusa import MedusaHeads
from specserve.runtime.engine import Forward, Op
from specserve.runtime.models import LoadedModel
from specserve.runtime.workers import TargetWorker


@dataclass(frozen=True)
class MedusaOptions:
    tree: MedusaTree  # the candidates' shape for greedy and typical-acceptance requests
    typical: bool = False  # typical acceptance (lossy) for sampled requests
    posterior_threshold: float = POSTERIOR_THRESHOLD
    posterior_alpha: float = POSTERIOR_ALPHA


@dataclass(frozen=True)
class Candidates:
    """The next step's proposal: a chain (parents None) or a tree, hanging off the pending token."""

    tokens: list[int]
    parents: list[int] | None


def medusa_options_from_proto(params, heads: MedusaHeads | None, field: str) -> MedusaOptions:
    """A MedusaParams message -> MedusaOptions; InvalidArgument / FailedPrecondition naming `field`."""
    if heads is None:
        raise FailedPrecondition(f"{field}: this target service hosts no Medusa heads (start it with --medusa)")
    choices = [list(path.ranks) for path in params.choices] or default_choices(heads.num_heads)
    tree = build_medusa_tree(choices, heads.num_heads, field=f"{field}.choices")
    threshold = params.posterior_threshold if params.HasField("posterior_threshold") else POSTERIOR_THRESHOLD
    alpha = params.posterior_alpha if params.HasField("posterior_alpha") else POSTERIOR_ALPHA
    check_posterior(threshold, alpha, field)
    return MedusaOptions(tree, params.typical_acceptance, threshold, alpha)


def check_posterior(threshold: float, alpha: float, field: str) -> None:
    if not 0.0 < threshold <= 1.0:
        raise InvalidArgument(f"{field}.posterior_threshold: must be in (0, 1], got {threshold}")
    if not 0.0 < alpha <= 1.0:
        raise InvalidArgument(f"{field}.posterior_alpha: must be in (0, 1], got {alpha}")


class MedusaTargetWorker(TargetWorker):
    """A TargetWorker whose every op also leaves the next candidates in `last_candidates`
    when the session was started with Medusa options (else it is a plain TargetWorker)."""

    def __init__(self, loaded: LoadedModel, heads: MedusaHeads | None):
        super().__init__(loaded)
        self.heads = heads
        self.medusa: MedusaOptions | None = None
        self.last_candidates: Candidates | None = None
        self._candidate_probs: torch.Tensor | None = None  # [K, V] a sampled chain's draft distributions
        self._new_hidden: torch.Tensor | None = None  # [n, H] states of the last op's new positions

    def start_op(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False,
                 medusa: MedusaOptions | None = None) -> Op[int]:
        if medusa is not None:
            if self.heads is None:
                raise FailedPrecondition("medusa: this target service hosts no Medusa heads (start it with --medusa)")
            if medusa.tree.depth > self.heads.num_heads:
                raise InvalidArgument(f"medusa.choices: the tree is {medusa.tree.depth} deep but the heads are {self.heads.num_heads}")
        self.medusa = medusa
        token = yield from super().start_op(prompt, sampling, seed, return_hidden_states)
        if medusa is not None:
            self._propose(self._new_hidden[-1])
        return token

    def _extend_op(self, token_ids: list[int], logits_for: int) -> Op[torch.Tensor]:
        if self.medusa is None:
            return (yield from super()._extend_op(token_ids, logits_for))
        logits, self._new_hidden = yield Forward(self.kv, token_ids, logits_for=logits_for, hidden=True)  # [l, V], [n, H]
        if self.return_hidden_states:
            self.last_hidden_states = self._new_hidden
        return logits

    def verify_op(self, committed_len: int, token_ids: list[int], draft_probs: torch.Tensor | None) -> Op[Verdict]:
        if self.medusa is None:
            return (yield from super().verify_op(committed_len, token_ids, draft_probs))
        proposal = token_ids[1:]
        if not self.sampling.greedy and draft_probs is None and self._candidate_probs is not None:
            chain = self.last_candidates.tokens if self.last_candidates.parents is None else []
            if proposal == chain[:len(proposal)]:  # the heads' own chain: their distributions are the draft's
                draft_probs = self._candidate_probs[:len(proposal)]
        verdict = yield from super().verify_op(committed_len, token_ids, draft_probs)
        self._propose(self._new_hidden[verdict.accepted])
        return verdict

    def verify_tree_op(self, committed_len: int, pending: int, tree: DraftTree) -> Op[Verdict]:
        if self.medusa is None:
            return (yield from super().verify_tree_op(committed_len, pending, tree))
        self._check_started()
        typical = self.medusa.typical and not self.sampling.greedy
        if not self.sampling.greedy and not typical:
            raise InvalidArgument("parents: a sampled Medusa session without typical acceptance verifies chains only")
        token_ids = self._check_tree_op(committed_len, pending, tree)
        self.reseed(committed_len)
        own = tuple(tree.parents) == self.medusa.tree.parents
        mask = self.medusa.tree.mask if own else ancestor_mask(tree)  # [n+1, n+1]
        positions = [committed_len + d for d in [0, *tree.depths()]]
        logits, hidden = yield Forward(self.kv, token_ids, logits_for=len(token_ids), hidden=True, positions=positions,
                                       visible=mask)  # [n+1, V], [n+1, H]
        if typical:
            probs = warp(logits, self.sampling)  # [n+1, V]
            path = accept_typical_tree(probs, tree, self.medusa.posterior_threshold, self.medusa.posterior_alpha)
            last_row = 0 if not path else path[-1] + 1
            verdict = Verdict(len(path), [tree.tokens[i] for i in path] + [sample(probs[last_row], self.generator)])
        else:
            verdict, path = accept_greedy_tree(logits, tree)
        kept = [0] + [1 + i for i in path]  # the pending token and the accepted nodes
        self.kv.keep(committed_len, kept)
        if self.return_hidden_states:
            self.last_hidden_states = hidden[kept].cpu()  # [1 + accepted, H]
        self._propose(hidden[kept[-1]])
        return verdict

    @torch.inference_mode()
    def _propose(self, state: torch.Tensor) -> None:
        """The heads read the last accepted state [H] and leave the next candidates."""
        logits = self.heads(state.to(next(self.heads.parameters()).dtype)).float().cpu()  # [K, V_out]
        if self.sampling.greedy or self.medusa.typical:
            tree = self.medusa.tree
            top = [self.heads.to_token_ids(logits[h].topk(max(1, tree.top_k(h))).indices).tolist() for h in range(tree.depth)]
            filled = tree.fill(top)
            self.last_candidates = Candidates(filled.tokens, filled.parents)
            self._candidate_probs = None
            return
        tokens, rows = [], []
        for h in range(self.heads.num_heads):
            q = warp(logits[h], self.sampling)  # [V_out]
            index = sample(q, self.generator)
            tokens.append(int(self.heads.to_token_ids(torch.tensor(index))))
            dense = torch.zeros(self.loaded.vocab_size)  # [V]
            if self.heads.vocab_ids is None:
                dense[: q.numel()] = q
            else:
                dense[self.heads.vocab_ids] = q
            rows.append(dense)
        self.last_candidates = Candidates(tokens, None)
        self._candidate_probs = torch.stack(rows)  # [K, V]


class LocalMedusaTargetSession:
    """The core loop's target session on a MedusaTargetWorker in this process (no gRPC):
    `start(..., medusa=MedusaOptions)`, then `last_candidates` after every op."""

    def __init__(self, loaded: LoadedModel, heads: MedusaHeads):
        self.worker = MedusaTargetWorker(loaded, heads)
        self.last_compute_ms = 0.0

    @property
    def last_hidden_states(self) -> torch.Tensor | None:
        return self.worker.last_hidden_states

    @property
    def last_candidates(self):
        from specserve.core.speculate import Proposal

        c = self.worker.last_candidates
        return None if c is None else Proposal(list(c.tokens), None, list(c.parents) if c.parents else None)

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False,
                    medusa: MedusaOptions | None = None) -> int:
        return self.worker.start(prompt, sampling, seed, return_hidden_states, medusa=medusa)

    async def verify(self, committed_len: int, tokens: list[int], draft_probs, parents: list[int] | None = None) -> Verdict:
        import time

        from specserve.core.tree import split_tree

        began = time.perf_counter()
        if parents:
            verdict = self.worker.verify_tree(committed_len, *split_tree(tokens, parents))
        else:
            verdict = self.worker.verify(committed_len, tokens, draft_probs)
        self.last_compute_ms = (time.perf_counter() - began) * 1e3
        return verdict
