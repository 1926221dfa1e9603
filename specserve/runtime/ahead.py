"""Drafting ahead of a verdict (asynchronous drafting) on a token draft's session.

While the target verifies the proposal at the end of the draft's sequence, the draft
drafts the next proposal for the verdicts most likely to come back: "all accepted,
then bonus token b" and "j accepted, then recovered token r", for its own likeliest
guesses b / r at that position (a rejected proposal is never a guess for the token
that replaces it). One op:

1. `speculate_op` brings the sequence up to date (resuming from an outcome drafted
   earlier when the sequence continues it), feeds its last token (the draft's guesses
   for the bonus position) and lays out one `Branch` per outcome: the first continues
   in the session's own cache, the others in copies of it (`EngineSession.fork`),
   each rolled back to where its outcome departs.
2. `branch_op` drafts k tokens after one branch's guessed token. The service runs
   every branch's op at once, so the scheduler puts their rows in the same forward
   passes (one batch; a pass costs about one row's time on a GPU-like engine).

Afterwards the session's sequence is the first outcome's and the others wait in
`DraftWorker.branches` until the next op picks the one its sequence continues.
Greedy sessions only: sampled requests draft synchronously (drafting ahead for them, each
drafted token carrying the distribution it was drawn from, is not built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specserve.core.errors import InvalidArgument
from specserve.runtime.engine import EngineSession, Forward, Op
from specserve.runtime.workers import DraftWorker, ranked_tokens

MAX_GUESSES = 4  # candidates per outcome for the bonus or recovered token
MAX_OUTCOMES = 8  # outcomes per op, all guesses together


@dataclass
class Branch:
    """One hypothesised verdict and the draft's next proposal for it."""

    kv: EngineSession  # holds held[:-1] (the guess and proposal's last token are fed as drafting goes)
    held: list[int]  # the sequence up to the outcome's guessed token, then its proposal once drafted
    accepted: int  # proposals of the verified proposal the verdict accepts
    token: int  # the guessed bonus / recovered token
    shared: int  # leading tokens of held equal to the session's own sequence after the op
    proposal: list[int] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> logits [V_out] its proposal came from

    @property
    def drafted(self) -> bool:
        return bool(self.proposal)

    @property
    def context_len(self) -> int:
        """The length of the sequence the proposal follows (its accepted tokens and guess included)."""
        return len(self.held) - len(self.proposal)


def speculate_op(worker: DraftWorker, committed_len: int, token_ids: list[int], proposal_len: int,
                 outcomes: list[tuple[int, int]], k: int) -> Op[list[Branch]]:
    """Step 1 of the module doc; outcomes: (accepted, guesses) likeliest first. Returns the
    branches (the session's own first), to draft with `branch_op` unless already `drafted` (a lone
    branch is drafted here); an outcome whose guesses the draft cannot make (no ranking of that
    position) or cannot draft beside the first (an engine without `fork`) is left out."""
    worker._check_started()
    if not worker.sampling.greedy:
        raise InvalidArgument("speculate: drafting ahead serves greedy sessions only; sampled requests draft synchronously")
    if k < 1:
        raise InvalidArgument("speculate.num_tokens: must be at least 1")
    if not outcomes:
        raise InvalidArgument("speculate.outcomes: at least one outcome")
    if sum(guesses for _, guesses in outcomes) > MAX_OUTCOMES:
        raise InvalidArgument(f"speculate.outcomes: at most {MAX_OUTCOMES} outcomes (guesses) in all")
    for i, (accepted, guesses) in enumerate(outcomes):
        if accepted > proposal_len:
            raise InvalidArgument(f"speculate.outcomes[{i}].accepted: {accepted} exceeds proposal_len {proposal_len}")
        if not 1 <= guesses <= MAX_GUESSES:
            raise InvalidArgument(f"speculate.outcomes[{i}].guesses: must be in [1, {MAX_GUESSES}], got {guesses}")
    if proposal_len >= committed_len + len(token_ids):
        raise InvalidArgument("speculate.proposal_len: the proposal must follow at least one token of the sequence")
    keep = worker.resume(committed_len, token_ids, room=1 + k)  # the guessed token, then k proposals
    held = worker.held
    logits = (yield Forward(worker.kv, held[keep:]))[0][0]  # [V_out] after the whole sequence: the bonus position
    worker.forward_passes += 1
    worker.scores[len(held)] = logits
    base = len(held) - proposal_len  # the verified proposal starts here
    starts: list[tuple[int, int, int]] = []  # (accepted, position of the guess, guess)
    for accepted, guesses in outcomes:
        position = base + accepted
        scores = worker.scores.get(position)
        ranked = [] if scores is None else ranked_tokens(scores, worker.kv.vocab_ids)
        if accepted < proposal_len:  # a stop: the recovered token is not the proposal rejected there
            ranked = [t for t in ranked if t != held[position]]
        starts += [(accepted, position, token) for token in ranked[:guesses]]
    if not hasattr(worker.kv, "fork"):
        starts = starts[:1]
    if not starts:
        return []
    first_position = starts[0][1]
    branches = []
    for i, (accepted, position, token) in enumerate(starts):
        # The first outcome continues in the session's own cache, rolled back last (the copies need it whole).
        kv = worker.kv.fork() if i else worker.kv
        if i:
            kv.rollback(position)
        branches.append(Branch(kv, held[:position] + [token], accepted, token, shared=min(position, first_position)))
    worker.kv.rollback(first_position)
    worker.held = list(branches[0].held)
    worker.scores = {}
    worker.branches = branches[1:]
    if len(branches) == 1:  # nothing to draft beside it: drafted here, with no trip back to the service
        yield from branch_op(worker, branches[0], k)
    return branches


def branch_op(worker: DraftWorker, branch: Branch, k: int) -> Op[None]:
    """Drafts k tokens after the branch's guessed token (step 2 of the module doc)."""
    proposal, _, scores = yield from worker.draft_chain_op(branch.kv, [branch.token], len(branch.held), k)
    branch.proposal = proposal
    branch.held = branch.held + proposal
    branch.scores = scores
    if branch.kv is worker.kv:  # the session's own sequence
        worker.held = list(branch.held)
        worker.scores = scores
