"""Outcomes of a verdict drafted ahead (asynchronous drafting): which verdicts to draft
for, and which drafted outcome, if any, a verdict makes the next proposal.

A verdict on a chain of L proposals is "j accepted, then token t" (j < L: t is the
recovered token; j = L: the bonus token). Before the verdict, the draft guesses t with
its own likeliest tokens at that position. An outcome is keyed by (j, t) and carries
the length of the record it follows, so one drafted for any other record (stale) is
recognised and dropped: the orchestrator owns the record and never applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.core.acceptance import Verdict
from specserve.core.speculate import Proposal

MIN_OUTCOME_PROBABILITY = 0.05  # outcomes less likely than this (by the model below) are not drafted


@dataclass(frozen=True)
class OutcomeRequest:
    """Draft for "`accepted` proposals accepted, then each of the draft's `guesses` likeliest tokens"."""

    accepted: int
    guesses: int


@dataclass(frozen=True)
class Outcome:
    """The draft's next proposal for one hypothesised verdict."""

    accepted: int
    token: int  # the guessed bonus / recovered token
    context_len: int  # the length of the record the proposal follows (the guess included)
    proposal: Proposal


@dataclass(frozen=True)
class Speculation:
    """What one speculate op returned."""

    outcomes: list[Outcome]
    compute_ms: float  # the draft's time for the op (its outcomes drafted side by side)


def choose_outcomes(proposal_len: int, acceptance: float, budget: int,
                    min_probability: float = MIN_OUTCOME_PROBABILITY) -> list[OutcomeRequest]:
    """The likeliest verdicts on a chain of proposal_len proposals, at most `budget` of them.

    The model: each proposal is accepted with probability a (the request's measured
    acceptance), independently, so the verdict stops after exactly j < L with a^j (1-a)
    and accepts all with a^L; the draft's i-th likeliest token (its rejected proposal left
    out) is the target's with a (1-a)^(i-1). Outcomes less likely than min_probability are
    dropped, the likeliest one is always kept. Likeliest first; one request per j.
    """
    a = min(max(acceptance, 0.01), 0.99)
    scored = []  # (probability, accepted, i-th guess)
    for j in range(proposal_len + 1):
        reach = a**j * (1.0 if j == proposal_len else 1.0 - a)
        for i in range(1, budget + 1):
            scored.append((reach * a * (1.0 - a) ** (i - 1), j, i))
    scored.sort(key=lambda item: (-item[0], -item[1], item[2]))
    kept = [item for n, item in enumerate(scored[:budget]) if n == 0 or item[0] >= min_probability]
    guesses: dict[int, int] = {}  # accepted -> guesses, in order of the likeliest
    for _, j, i in kept:
        guesses[j] = max(guesses.get(j, 0), i)
    return [OutcomeRequest(j, g) for j, g in guesses.items()]


def match_outcome(outcomes: list[Outcome], verdict: Verdict, record_len: int) -> tuple[Outcome | None, int]:
    """The outcome the verdict makes the next proposal (None: draft afresh), and how many of the
    outcomes were stale: drafted for a record of another length than the orchestrator's
    (`record_len`, the verdict's tokens included), which are never applied."""
    stale = sum(1 for o in outcomes if o.context_len != record_len - verdict.accepted + o.accepted)
    for outcome in outcomes:
        if (outcome.accepted, outcome.token) == (verdict.accepted, verdict.tokens[-1]):
            return (outcome if outcome.context_len == record_len else None), stale
    return None, stale
