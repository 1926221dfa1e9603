"""The decoding loop with asynchronous drafting: the draft drafts the next step while the
target verifies this one.

Each pipelined step sends its proposal to the target and, at once, asks the draft for
the next proposal under the likeliest verdicts (`core/outcomes.py`). When the verdict
matches a drafted outcome, the next proposal goes to the target straight away; else it
is drafted afresh (or the step is a plain one), as `core/async_plan.py` plans. The
loop owns the token record: an outcome is applied only when the record is exactly the
one it was drafted for. At most one op is in flight per session (one verify, one
draft op). The tokens of a step stream to the client while the next step verifies.

Greedy requests with a proposer that drafts ahead (`speculate`); the output is the
target's own whatever the proposals. Synchronous steps (auto mode, when drafting ahead
is not expected to pay) follow the request's speculation controller as `decode` does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from specserve.core.async_plan import AheadPlanner
from specserve.core.controller import StepPlan
from specserve.core.outcomes import OutcomeRequest, Speculation, choose_outcomes, match_outcome
from specserve.core.speculate import Chunk, DecodeRequest, Proposal, Proposer, StepRecord, TargetSession, _cut


class AheadProposer(Proposer, Protocol):
    async def speculate(self, sequence: list[int], proposal: Proposal, outcomes: list[OutcomeRequest], k: int) -> Speculation:
        """While `proposal` (following `sequence`) is verified: up to k tokens for each outcome."""


@dataclass
class AheadStats:
    """What drafting ahead did in one request."""

    pipelined_steps: int = 0  # steps that drafted ahead while the target verified
    outcomes_drafted: int = 0
    outcome_hits: int = 0  # steps whose proposal was a drafted outcome
    stale_outcomes: int = 0  # outcomes drafted for another record, dropped
    draft_compute_ms: float = 0.0  # the draft's compute for this request
    draft_exposed_ms: float = 0.0  # of which the request waited for with no verify running


async def decode_ahead(target: TargetSession, proposer: AheadProposer, request: DecodeRequest, planner: AheadPlanner,
                       ahead: AheadStats, max_outcomes: int = 3) -> AsyncIterator[Chunk]:
    """Generate tokens; the last chunk carries the finish reason (see `decode`)."""
    if not request.sampling.greedy:
        raise ValueError("drafting ahead serves greedy requests only")
    stats = request.stats
    prompt = list(request.prompt)
    budget = min(request.sampling.max_new_tokens, request.max_context_tokens - len(prompt))
    first, _ = await asyncio.gather(target.start(prompt, request.sampling, request.seed),
                                    proposer.start(prompt, request.sampling, request.seed + 1))
    stats.target_forward_passes += 1
    sequence = prompt + [first]  # the record; its last token is pending (not yet in the target's cache)
    chunk, finish = _cut([first], request.eos_token_ids, budget)
    stats.generated_tokens += len(chunk)
    yield Chunk(chunk, finish)
    if finish is not None:
        return
    plan = planner.plan(len(sequence))
    ready: Proposal | None = None  # the next proposal, when the last verdict matched an outcome
    streaming: Chunk | None = None  # the last step's tokens, sent on while the next step verifies
    verifying: asyncio.Future | None = None
    speculating: asyncio.Future | None = None
    try:
        while True:
            remaining = budget - (len(sequence) - len(prompt))
            began = time.perf_counter()
            exposed_ms = draft_ms = 0.0
            control = None  # the controller's plan of a synchronous step
            if ready is not None:
                proposal = _truncate(ready, remaining - 1)
            else:
                if plan.pipelined:
                    k = plan.k_fresh
                else:
                    control = request.speculation.plan(len(sequence), remaining)
                    k = control.k
                proposal = Proposal([])
                if min(k, remaining - 1) > 0:  # drafted now: on the critical path
                    passes = proposer.forward_passes
                    proposal = await proposer.propose(sequence, min(k, remaining - 1))
                    if proposal.tokens:  # (none: no draft replica answered)
                        exposed_ms = draft_ms = proposer.last_compute_ms
                        planner.observe_draft(draft_ms, proposer.forward_passes - passes, ahead=False)
            n = len(proposal.tokens)
            verifying = asyncio.ensure_future(target.verify(len(sequence) - 1, [sequence[-1], *proposal.tokens], proposal.probs))
            k_ahead = min(plan.k_ahead, remaining - n - 2)  # after all n accepted and a bonus, a proposal of k_ahead still fits
            if plan.pipelined and k_ahead >= 1:
                outcomes = choose_outcomes(n, planner.acceptance, planner.outcome_budget(max_outcomes))
                # A copy: the record grows with the verdict while the draft drafts ahead.
                speculating = asyncio.ensure_future(proposer.speculate(list(sequence), proposal, outcomes, k_ahead))
            await _let_start()  # the ops go out before this step's other work
            if streaming is not None:
                yield streaming
                streaming = None
            plan = planner.plan(len(sequence) + n)  # the next step's, while the target verifies
            verdict = await verifying
            verifying = None
            planner.observe_verify(target.last_compute_ms, overlapped=speculating is not None)
            planner.observe_verdict(n, verdict.accepted)
            stats.target_forward_passes += 1
            stats.decode_steps += 1
            stats.proposed_tokens += n
            stats.accepted_tokens += verdict.accepted
            if request.speculation is not None:
                request.speculation.record(control or StepPlan(n), n, n, verdict.accepted)
                observe_load = getattr(request.speculation, "observe_load", None)
                if observe_load is not None:
                    observe_load(getattr(target, "last_batch_tokens", 0) - (1 + n))
            sequence.extend(verdict.tokens)
            chunk, finish = _cut(verdict.tokens, request.eos_token_ids, remaining)
            stats.generated_tokens += len(chunk)
            ready = None
            if finish is None and speculating is not None:
                # The draft answers its ops in order: a fresh proposal would wait for this one anyway.
                waited = time.perf_counter()
                speculation: Speculation = await speculating
                speculating = None
                wait_ms = (time.perf_counter() - waited) * 1e3
                draft_ms += speculation.compute_ms
                exposed_ms += min(wait_ms, speculation.compute_ms)
                if speculation.outcomes:  # (none: the draft replica was lost meanwhile)
                    planner.observe_draft(speculation.compute_ms, k_ahead + 1, ahead=True)
                hit, stale = match_outcome(speculation.outcomes, verdict, len(sequence))
                ready = hit.proposal if hit is not None else None
                planner.observe_outcomes(len(speculation.outcomes), None if hit is None else speculation.outcomes.index(hit))
                ahead.pipelined_steps += 1
                ahead.outcomes_drafted += len(speculation.outcomes)
                ahead.outcome_hits += hit is not None
                ahead.stale_outcomes += stale
            ahead.draft_compute_ms += draft_ms
            ahead.draft_exposed_ms += exposed_ms
            if stats.steps is not None:
                wall_ms = (time.perf_counter() - began) * 1e3
                stats.steps.append(StepRecord(wall_ms, target.last_compute_ms + exposed_ms, n, verdict.accepted))
            if finish is not None:
                yield Chunk(chunk, finish)
                return
            streaming = Chunk(chunk)
    finally:
        # The request ended (finished, failed, or its client went away) with ops in flight: their
        # sessions close with it; nothing they return is used.
        for task in (verifying, speculating):
            if task is not None:
                _drop(task)


async def _let_start(turns: int = 4) -> None:
    """Lets ops just made into tasks run to their first wait (their message written): each layer of
    tasks under an op (failover, its timeout) starts one turn of the event loop after the one above."""
    for _ in range(turns):
        await asyncio.sleep(0)


def _truncate(proposal: Proposal, limit: int) -> Proposal:
    if len(proposal.tokens) <= limit:
        return proposal
    limit = max(limit, 0)
    return Proposal(proposal.tokens[:limit], proposal.probs[:limit] if proposal.probs else None)


def _drop(task: asyncio.Future) -> None:
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()  # retrieved: an op that failed after its request ended is no error of the request's
