"""The speculative decoding loop, written against two small interfaces.

The same loop drives models in this process (the in-process engine) and
remote sessions over gRPC (the orchestrator); only the adapters differ.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from specserve.core.acceptance import Verdict
from specserve.core.adaptive import SpeculationLength
from specserve.core.controller import SpeculationController, proposal_cap
from specserve.core.sampling import SamplingConfig
from specserve.core.tree import DraftTree


class Finish(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


@dataclass(frozen=True)
class Proposal:
    tokens: list[int]
    # The distributions the tokens were drawn from, in whatever form the target
    # session takes (a [k, V] tensor in process, protobuf messages over gRPC);
    # None for greedy decoding or a deterministic proposer.
    probs: Any = None
    # A tree instead of a chain: the parent of each token (-1: a child of the pending
    # token, else an earlier index; see core.tree). None (or empty) for a chain.
    # Trees are verified greedily only, so a proposer drafts them for greedy requests.
    parents: list[int] | None = None

    @property
    def depth(self) -> int:
        """The most tokens one verification can accept: a chain's length, a tree's depth."""
        return DraftTree(self.tokens, self.parents).depth if self.parents else len(self.tokens)


class TargetSession(Protocol):
    last_compute_ms: float  # model time of the last call
    # Optional: tokens in the forward pass the last call rode in, its own included (a
    # batching target shares passes among sessions); 0 or absent: unknown.
    last_batch_tokens: int
    # With return_hidden_states: after start and after every verify, the hidden states
    # of the positions the call kept, in whatever form the proposer takes (opaque here).
    last_hidden_states: Any

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False) -> int:
        """Prefill the prompt; return the first generated token."""

    async def verify(self, committed_len: int, tokens: list[int], draft_probs: Any, parents: list[int] | None = None) -> Verdict:
        """Score [pending, d1..dk] and apply the acceptance rule. With parents (non-empty),
        d1..dk are a tree's nodes (Proposal.parents), verified greedily: the verdict holds
        the accepted path's tokens, then the target's token after it."""


class Proposer(Protocol):
    """A proposer may also declare `needs_target_hidden_states = True` (a feature draft):
    the target then returns its hidden states, and the proposer gets them through
    `observe_target_hidden_states(hidden)` after the target's start and after every
    verify, in order, to send along with its next propose."""

    forward_passes: int
    last_compute_ms: float  # model time of the last call

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        """Prepare for a request (e.g. prefill a draft model)."""

    async def propose(self, sequence: list[int], k: int) -> Proposal:
        """Propose up to k tokens to follow sequence (prompt + output so far), or a tree
        of depth at most k (any number of nodes) when the proposer drafts trees. A proposer
        with `drafts_trees` true also takes `nodes=`: the tree's node budget for this step."""


@dataclass(frozen=True)
class StepRecord:
    wall_ms: float  # propose + verify as the loop saw it
    compute_ms: float  # of which the models computed
    proposed: int  # tokens sent for verification: a chain's length, or a tree's node count
    accepted: int


@dataclass
class DecodeStats:
    target_forward_passes: int = 0
    decode_steps: int = 0  # target forward passes after prefill
    proposed_tokens: int = 0  # tokens sent for verification; every node of a tree counts
    accepted_tokens: int = 0
    generated_tokens: int = 0
    steps: list[StepRecord] | None = None  # filled when not None

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per decoding forward pass of the target (tau)."""
        return self.generated_tokens / self.decode_steps if self.decode_steps else 0.0


@dataclass(frozen=True)
class Chunk:
    tokens: list[int]  # new output tokens, EOS excluded
    finish: Finish | None = None


@dataclass
class DecodeRequest:
    prompt: list[int]
    sampling: SamplingConfig
    seed: int
    eos_token_ids: frozenset[int]
    max_context_tokens: int
    # Plans each step and learns from it (core.controller.SpeculationController, or the
    # cost-blind SpeculationLength); None: plain decoding.
    speculation: SpeculationController | SpeculationLength | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)


async def decode(target: TargetSession, proposer: Proposer | None, request: DecodeRequest) -> AsyncIterator[Chunk]:
    """Generate tokens; the last chunk carries the finish reason.

    The caller may stop iterating at any time (a stop string, a cancelled client);
    closing the sessions is the caller's job.
    """
    stats = request.stats
    prompt = list(request.prompt)
    budget = min(request.sampling.max_new_tokens, request.max_context_tokens - len(prompt))
    wants_hidden = getattr(proposer, "needs_target_hidden_states", False)
    # A proposer the target runs itself (Medusa heads): the target's start gets its options,
    # and every target response carries the next candidates (`last_candidates`).
    colocated = getattr(proposer, "target_options", None)
    extra = {} if colocated is None else {"medusa": colocated}
    starts = [target.start(prompt, request.sampling, request.seed, return_hidden_states=wants_hidden, **extra)]
    if proposer is not None:
        starts.append(proposer.start(prompt, request.sampling, request.seed + 1))
    first, *_ = await asyncio.gather(*starts)
    if wants_hidden:
        proposer.observe_target_hidden_states(target.last_hidden_states)
    if colocated is not None:
        proposer.observe_target_candidates(target.last_candidates)
    stats.target_forward_passes += 1
    sequence = prompt + [first]  # the last token is pending: generated, not yet in the target's cache
    chunk, finish = _cut([first], request.eos_token_ids, budget)
    stats.generated_tokens += len(chunk)
    if finish is not None:
        yield Chunk(chunk, finish)
        return
    yield Chunk(chunk)
    while True:
        remaining = budget - (len(sequence) - len(prompt))
        step_began = time.perf_counter()
        proposal, draft_ms, plan = Proposal([]), 0.0, None
        if proposer is not None and request.speculation is not None:
            # Never propose past the budget: one verify yields accepted + 1 tokens (k caps
            # a chain's length and a tree's depth).
            plan = request.speculation.plan(len(sequence), remaining)
            k = min(plan.k, proposal_cap(remaining))
            if k > 0:
                # A tree node budget goes only to a proposer that drafts trees.
                if plan.nodes and getattr(proposer, "drafts_trees", False):
                    proposal = await proposer.propose(sequence, k, nodes=plan.nodes)
                else:
                    proposal = await proposer.propose(sequence, k)
                draft_ms = proposer.last_compute_ms
        verdict = await target.verify(len(sequence) - 1, [sequence[-1], *proposal.tokens], proposal.probs,
                                      parents=proposal.parents or None)
        if wants_hidden:
            proposer.observe_target_hidden_states(target.last_hidden_states)
        if colocated is not None:
            proposer.observe_target_candidates(target.last_candidates)
        if stats.steps is not None:
            wall_ms = (time.perf_counter() - step_began) * 1e3
            stats.steps.append(StepRecord(wall_ms, draft_ms + target.last_compute_ms, len(proposal.tokens), verdict.accepted))
        stats.target_forward_passes += 1
        stats.decode_steps += 1
        stats.proposed_tokens += len(proposal.tokens)
        stats.accepted_tokens += verdict.accepted
        if plan is not None:
            request.speculation.record(plan, proposal.depth, len(proposal.tokens), verdict.accepted)
            # Other sessions' rows in the target's pass (continuous batching); greedy requests
            # only, so a seeded sampled request's steps never depend on the server's load.
            observe_load = getattr(request.speculation, "observe_load", None)
            if observe_load is not None and request.sampling.greedy:
                observe_load(getattr(target, "last_batch_tokens", 0) - (1 + len(proposal.tokens)))
        sequence.extend(verdict.tokens)
        chunk, finish = _cut(verdict.tokens, request.eos_token_ids, remaining)
        stats.generated_tokens += len(chunk)
        yield Chunk(chunk, finish)
        if finish is not None:
            return


def _cut(tokens: Sequence[int], eos_token_ids: frozenset[int], remaining: int) -> tuple[list[int], Finish | None]:
    """Tokens up to (excluding) the first EOS and within the budget, and why they end."""
    for i, token in enumerate(tokens[:remaining]):
        if token in eos_token_ids:
            return list(tokens[:i]), Finish.EOS
    if len(tokens) >= remaining:
        return list(tokens[:remaining]), Finish.LENGTH
    return list(tokens), None


class DraftSequenceTracker:
    """What a draft session holds, so each propose call sends only the difference.

    The draft's sequence is everything it was sent plus its own last proposals.
    For a new sequence, the longest common prefix with it is what the draft keeps
    (committed_len); the rest of the new sequence is appended.

    A feature draft keeps no proposals and holds only tokens it was sent a hidden
    state for: reset with prompt[:1], record with no proposal; each diff then
    covers exactly the tokens whose hidden states arrived since the last propose.
    """

    def __init__(self) -> None:
        self.held: list[int] = []
        self.confirmed = 0  # prefix of `held` known to match every later sequence

    def reset(self, prompt: list[int]) -> None:
        self.held = list(prompt)
        self.confirmed = len(prompt)

    def diff(self, sequence: list[int]) -> tuple[int, list[int]]:
        """(committed_len, tokens to append) that turn the held sequence into `sequence`."""
        common = self.confirmed
        limit = min(len(self.held), len(sequence))
        while common < limit and self.held[common] == sequence[common]:
            common += 1
        return common, sequence[common:]

    def record(self, sequence: list[int], proposal: list[int]) -> None:
        # Every token of `sequence` came from the target, so it is final.
        self.held = list(sequence) + list(proposal)
        self.confirmed = len(sequence)

    def record_ahead(self, sequence: list[int], held: list[int]) -> None:
        """After drafting ahead of a verdict on the proposal that follows `sequence`: the draft
        holds `held`, its first outcome's sequence (only `sequence` is final)."""
        self.held = list(held)
        self.confirmed = len(sequence)
