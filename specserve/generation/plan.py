"""From a validated job to the decoding that serves it: the one place where a request's
proposer, speculation policy and decoding loop are chosen.

The orchestrator (sessions on remote replicas, with failover) and the in-process bench
runner (models in this process) both describe what serves a request as a `Serving` and
get back a `Plan`: the sessions, the loop's `DecodeRequest` and the loop's steps. Running
the steps, turning them into text and closing the sessions stay the caller's job.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from specserve.core.async_decode import AheadStats, decode_ahead
from specserve.core.async_plan import AheadPlanner
from specserve.core.controller import CostProfile, speculation_policy
from specserve.core.lookahead_decode import decode_lookahead
from specserve.core.medusa_proposer import ColocatedMedusaProposer
from specserve.core.ngram_pool import LOOKUP_KEY, NgramPool, lookup_fallback
from specserve.core.proposers import PromptLookupProposer, WithLookupBranch
from specserve.core.speculate import Chunk, DecodeRequest, Proposer, TargetSession, decode
from specserve.core.tree import TreeShape
from specserve.generation.requests import Job, Limits
from specserve.v1 import orchestrator_pb2 as pb


@dataclass(frozen=True)
class Serving:
    """What serves one request: how its sessions open, and what is known of their models."""

    open_target: Callable[[], TargetSession]
    # The draft's proposer, drafting trees of the given shape where it drafts trees (a feature
    # draft, for greedy requests); raises when no draft can serve the request.
    open_draft: Callable[[TreeShape | None], Proposer]
    eos_token_ids: frozenset[int]
    max_context_tokens: int
    # The models' measured cost profiles (None: none reported), and what one op's round trip
    # to each adds to a step (0 in process).
    target_costs: CostProfile | None = None
    draft_costs: CostProfile | None = None
    target_round_trip_ms: float = 0.0
    draft_round_trip_ms: float = 0.0
    draft_needs_target_hidden_states: bool = False  # the draft is a feature draft
    draft_batches: bool = False  # the draft batches outcomes drafted ahead into shared forward passes
    shared_cores: bool = False  # target and draft compute on one CPU, taken to share its cores
    pool: NgramPool | None = None  # the n-gram pool shared across requests; None: none


@dataclass
class Plan:
    """One request's decoding, ready to run."""

    target: TargetSession
    proposer: Proposer | None  # None: plain decoding, or LOOKAHEAD (the target proposes)
    decoding: DecodeRequest  # its stats fill in as the steps run
    steps: AsyncIterator[Chunk]  # the decoding loop; the last chunk carries the finish reason
    ahead: AheadStats | None = None  # drafting ahead (asynchronous drafting): its stats
    synchronous_reason: str = ""  # why a request that asked to draft ahead drafts synchronously


def plan(job: Job, limits: Limits, serving: Serving, step_timings: bool = False) -> Plan:
    """The sessions, proposer, speculation policy and decoding loop that serve `job`."""
    proposer = _proposer(job, limits, serving)
    target = serving.open_target()
    decoding = DecodeRequest(
        prompt=job.prompt_ids,
        sampling=job.sampling,
        seed=job.seed if job.seed is not None else secrets.randbits(62),
        eos_token_ids=serving.eos_token_ids,
        max_context_tokens=serving.max_context_tokens,
        speculation=_policy(job, limits, serving) if job.k else None,
    )
    if step_timings:
        decoding.stats.steps = []
    pool = _pool(job, serving)
    if pool is not None and hasattr(pool, "prefetch"):
        pool.prefetch([tuple(job.prompt_ids[-LOOKUP_KEY:]), (job.prompt_ids[-1],)])
    reason = synchronous_reason(job, proposer, serving.shared_cores)
    if job.method == pb.LOOKAHEAD:
        costs = _controlled_target_costs(limits, serving)
        steps = decode_lookahead(target, decoding, job.lookahead, pool, costs.verify_chain if costs else None)
        return Plan(target, proposer, decoding, steps, synchronous_reason=reason)
    if job.method == pb.DRAFT_MODEL and job.async_draft != "off" and not reason:
        ahead = AheadStats()
        steps = decode_ahead(target, proposer, decoding, _ahead_planner(job, limits, serving), ahead,
                             _outcome_budget(limits, serving))
        return Plan(target, proposer, decoding, steps, ahead, reason)
    return Plan(target, proposer, decoding, decode(target, proposer, decoding), synchronous_reason=reason)


def _pool(job: Job, serving: Serving) -> NgramPool | None:
    # The pool changes with other traffic, and different proposals consume the random
    # stream differently: a seeded sampling request skips it so that it stays
    # reproducible. Greedy output never depends on the proposals.
    return serving.pool if job.sampling.greedy or job.seed is None else None


def _proposer(job: Job, limits: Limits, serving: Serving) -> Proposer | None:
    if job.method == pb.MEDUSA:
        return ColocatedMedusaProposer(job.medusa)  # the target's own heads: no draft session
    if job.method == pb.DRAFT_MODEL:
        # A feature draft drafts from the target's hidden states, which the loop then asks for,
        # and trees for greedy requests (unless the request's tree_nodes is 0), to which
        # prompt lookup adds its continuation as one more branch.
        draft = serving.open_draft(limits.tree_shape(job.tree_nodes))
        return WithLookupBranch(draft) if serving.draft_needs_target_hidden_states else draft
    if job.method == pb.PROMPT_LOOKUP:
        pool = _pool(job, serving)
        return PromptLookupProposer(fallback=lookup_fallback(pool) if pool is not None else None)
    return None


def _controlled_target_costs(limits: Limits, serving: Serving) -> CostProfile | None:
    """The target's costs where the server controls speculation by cost, else None."""
    return serving.target_costs if limits.speculation_control == "cost" else None


def _policy(job: Job, limits: Limits, serving: Serving):
    drafted = job.method == pb.DRAFT_MODEL
    trees = drafted and job.sampling.greedy and serving.draft_needs_target_hidden_states and job.tree_nodes > 0
    return speculation_policy(
        _controlled_target_costs(limits, serving), serving.draft_costs if drafted else None, k=job.k,
        k_max=limits.max_speculative_tokens, fixed=job.fixed_length, tree_nodes=job.tree_nodes if trees else 0,
        tree_width=limits.tree_width, step_overhead_ms=serving.target_round_trip_ms,
        draft_overhead_ms=serving.draft_round_trip_ms if drafted else 0.0)


def synchronous_reason(job: Job, proposer: Proposer | None, shared_cores: bool) -> str:
    """Why a request that asked for asynchronous drafting drafts synchronously ('' when it does not,
    or did not ask: the server's default reaches DRAFT_MODEL requests only)."""
    if job.async_draft == "off" or (job.method != pb.DRAFT_MODEL and not job.async_draft_asked):
        return ""
    if job.method != pb.DRAFT_MODEL:
        return "asynchronous drafting applies to DRAFT_MODEL only"
    if not job.sampling.greedy:
        return "sampled requests draft synchronously: drafting ahead is built for greedy requests only"
    if getattr(proposer, "needs_target_hidden_states", False) or not hasattr(proposer, "speculate"):
        return ("the draft service hosts a feature draft, which drafts from the target's hidden states of "
                "verified tokens and so cannot draft ahead of a verdict")
    if job.async_draft == "auto" and shared_cores:
        return ("auto: target and draft compute on one CPU (taken to share its cores), where drafting ahead "
                "buys little; ASYNC_DRAFT_ON drafts ahead anyway")
    return ""


def _ahead_planner(job: Job, limits: Limits, serving: Serving) -> AheadPlanner:
    return AheadPlanner(job.async_draft, job.k, limits.max_speculative_tokens, serving.target_costs, serving.draft_costs,
                        serving.target_round_trip_ms, serving.draft_round_trip_ms, fixed=job.fixed_length,
                        shared_cores=serving.shared_cores)


def _outcome_budget(limits: Limits, serving: Serving) -> int:
    """Outcomes drafted ahead per step: the server's limit when the draft batches them into shared
    forward passes (a pass then costs about one row's time on a GPU-like engine), else one."""
    return limits.async_outcomes if serving.draft_batches else 1
