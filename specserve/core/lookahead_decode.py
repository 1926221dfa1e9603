"""The lookahead decoding loop: the orchestrator's side of lookahead (see core.lookahead).

The orchestrator owns the sequence, the Jacobi window and the request's n-gram pool;
each step sends the target the pending token, the window and the candidates chosen for
the pending token, and gets back the accepted tokens and the window's next level.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

from specserve.core.acceptance import Verdict
from specserve.core.controller import LOAD_DECAY, CostTable
from specserve.core.lookahead import CandidatePool, JacobiWindow, LookaheadShape, select_candidates
from specserve.core.ngram_pool import LOOKUP_KEY, NgramPool
from specserve.core.prompt_lookup import find_continuation
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import Chunk, DecodeRequest, StepRecord, _cut

LOOKUP_TOKENS = 8  # a prompt-lookup candidate (a match of the last 3 or 2 tokens) may be this long
WINDOW_COST_SHARE = 0.5  # under load, the window's rows may cost this much more than they cost alone


class LookaheadTarget(Protocol):
    last_compute_ms: float

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False) -> int:
        """Prefill the prompt; return the first generated token."""

    async def lookahead(self, committed_len: int, pending: int, levels: list[list[int]],
                        candidates: list[list[int]]) -> tuple[Verdict, list[int]]:
        """One lookahead step: (verdict over the candidates, the window's next level)."""


class WindowUnderLoad:
    """Whether a greedy step sends its Jacobi window, from the target's measured costs.

    The window's rows buy n-grams for later steps, not tokens now. On hardware where extra
    rows are nearly free (bf16 matrix units, GPUs) they pay; where a forward's cost grows
    with its rows (llama.cpp's CPU kernels, fp32 without matrix units) they do not: the
    window goes only while its rows add at most WINDOW_COST_SHARE to what the step costs
    without them. In a shared forward pass (continuous batching) they cost every session
    what they add to the pass: under load the window goes while that is at most
    (1 + WINDOW_COST_SHARE) times what they add to the step alone (`table`: the target's
    measured verify_chain costs), so a big batch on a curve that turns steep makes them
    dearer. Otherwise the step sends one window token (the window stands still, and the
    step verifies its candidates as prompt lookup would).
    """

    def __init__(self, table: CostTable):
        self.table = table
        self.load_tokens = 0.0  # other sessions' tokens in the target's passes (decaying mean)

    def observe(self, other_tokens: int) -> None:
        self.load_tokens = LOAD_DECAY * self.load_tokens + (1 - LOAD_DECAY) * max(other_tokens, 0)

    def send_window(self, window_rows: int, other_rows: int, context: int) -> bool:
        ms = self.table.ms
        alone = ms(other_rows + window_rows, context) - ms(other_rows, context)
        if alone > WINDOW_COST_SHARE * ms(other_rows, context):
            return False
        if self.load_tokens < 1.0:
            return True
        loaded = ms(self.load_tokens + other_rows + window_rows, context) - ms(self.load_tokens + other_rows, context)
        return loaded <= (1 + WINDOW_COST_SHARE) * alone


class LookaheadProposals:
    """Where a step's candidates come from, best first: a prompt-lookup match in the request's
    own tokens, the shared pool's continuation of the last 3 tokens, the request's own
    n-grams (window harvest and output) after the pending token, the shared pool's."""

    def __init__(self, shape: LookaheadShape, shared: NgramPool | None):
        self.shape = shape
        self.shared = shared
        self.local = CandidatePool()

    def observe(self, sequence: list[int], start: int) -> None:
        """Records the n-grams of sequence ending at index >= start + N - 1."""
        self.local.add_sequence(sequence, self.shape.ngram, start)

    async def candidates(self, sequence: list[int], max_len: int) -> list[list[int]]:
        if self.shape.guesses == 0 or max_len <= 0:
            return []
        n = self.shape.ngram - 1
        lookup = find_continuation(sequence, min(LOOKUP_TOKENS, max_len), 3, 2)
        shared_lookup: list = []
        shared_ngrams: list = []
        if self.shared is not None:
            shared_lookup, shared_ngrams = await asyncio.gather(
                self.shared.get(tuple(sequence[-LOOKUP_KEY:])), self.shared.get((sequence[-1],)))
        sources = [
            [lookup] if lookup else [],
            [c[: min(LOOKUP_TOKENS, max_len)] for c in shared_lookup[:1]],
            [c[:n] for c in self.local.get(sequence[-1])],
            [c[:n] for c in shared_ngrams],
        ]
        return select_candidates(sources, self.shape.guesses, max_len)


async def decode_lookahead(target: LookaheadTarget, request: DecodeRequest, shape: LookaheadShape,
                           shared: NgramPool | None = None, costs: CostTable | None = None) -> AsyncIterator[Chunk]:
    """Generate tokens by lookahead decoding; the last chunk carries the finish reason.

    Like core.speculate.decode, the caller may stop iterating at any time; closing the
    session is the caller's job. Proposed/accepted count candidate tokens. With `costs`
    (the target's verify_chain table), a greedy request trims its window under load
    (`WindowUnderLoad`); a sampled one never does, so its steps do not depend on load.
    """
    stats = request.stats
    prompt = list(request.prompt)
    budget = min(request.sampling.max_new_tokens, request.max_context_tokens - len(prompt))
    first = await target.start(prompt, request.sampling, request.seed)
    stats.target_forward_passes += 1
    sequence = prompt + [first]
    chunk, finish = _cut([first], request.eos_token_ids, budget)
    stats.generated_tokens += len(chunk)
    yield Chunk(chunk, finish)
    if finish is not None:
        return
    window = JacobiWindow(shape, prompt, request.seed)
    under_load = WindowUnderLoad(costs) if costs is not None and request.sampling.greedy else None
    proposals = LookaheadProposals(shape, shared)
    proposals.observe(sequence, 0)
    while True:
        remaining = budget - (len(sequence) - len(prompt))
        step_began = time.perf_counter()
        # One step yields accepted + 1 tokens: never propose past the budget; and the window
        # must fit the context (its top level reaches L + W - 1 positions past the pending token).
        candidates = await proposals.candidates(sequence, remaining - 1)
        levels = window.levels
        room = request.max_context_tokens - len(sequence)  # positions left after the pending token's
        if len(levels) + shape.window - 1 > room:
            levels = [levels[0][:room]]  # near the end of the context: one short level, not kept
        candidate_rows = 1 + sum(map(len, candidates))
        if under_load is not None and not under_load.send_window(sum(map(len, levels)) - 1, candidate_rows, len(sequence)):
            levels = [levels[0][:1]]  # one window token: the window stands still
        verdict, next_level = await target.lookahead(len(sequence) - 1, sequence[-1], levels, candidates)
        if under_load is not None:
            under_load.observe(getattr(target, "last_batch_tokens", 0) - candidate_rows - sum(map(len, levels)))
        if levels is window.levels and len(next_level) == shape.window:  # else the window stands still
            for ngram in window.update(next_level):
                proposals.local.add(ngram)
        if stats.steps is not None:
            wall_ms = (time.perf_counter() - step_began) * 1e3
            stats.steps.append(StepRecord(wall_ms, target.last_compute_ms, sum(map(len, candidates)), verdict.accepted))
        stats.target_forward_passes += 1
        stats.decode_steps += 1
        stats.proposed_tokens += sum(map(len, candidates))
        stats.accepted_tokens += verdict.accepted
        before = len(sequence)
        sequence.extend(verdict.tokens)
        proposals.observe(sequence, before - shape.ngram + 1)
        chunk, finish = _cut(verdict.tokens, request.eos_token_ids, remaining)
        stats.generated_tokens += len(chunk)
        yield Chunk(chunk, finish)
        if finish is not None:
            return
