"""The target's side of a lookahead step: one forward pass over the pending token, the Jacobi
window and the candidates (see specserve.core.lookahead), then acceptance and KV compaction.

A function over a TargetWorker's session rather than a worker of its own: a lookahead step
is one more op on the same session (its KV cache, sampling config and random generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.core.acceptance import Verdict
from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.lookahead import MAX_GUESSES, MAX_NGRAM, MAX_WINDOW, build_layout, verify_candidates
from specserve.core.sampling import warp
from specserve.runtime.engine import Forward, Op, run_alone
from specserve.runtime.workers import TargetWorker

MAX_CANDIDATE_TOKENS = 16  # per candidate: the longest continuation one step can accept


@dataclass(frozen=True)
class LookaheadResult:
    verdict: Verdict  # accepted candidate tokens, then one target token
    next_level: list[int]  # the target's greedy token after each top-level window token


def lookahead_step(worker: TargetWorker, committed_len: int, pending: int, levels: list[list[int]],
                   candidates: list[list[int]]) -> LookaheadResult:
    """A lookahead step run alone (see `lookahead_op`)."""
    return run_alone(lookahead_op(worker, committed_len, pending, levels, candidates))


def lookahead_op(worker: TargetWorker, committed_len: int, pending: int, levels: list[list[int]],
                 candidates: list[list[int]]) -> Op[LookaheadResult]:
    worker._check_started()
    if committed_len != worker.kv.length:
        raise FailedPrecondition(f"committed_len is {committed_len} but the session holds {worker.kv.length} tokens")
    _check_shape(levels, candidates)
    worker.reseed(committed_len)
    layout = build_layout(committed_len, pending, levels, candidates)
    worker._check_tokens(layout.tokens, "token_ids", 0)
    if max(layout.positions) >= worker.loaded.max_context_tokens:
        raise InvalidArgument(f"window: the lookahead window after {committed_len + 1} tokens exceeds the context "
                              f"window of {worker.loaded.max_context_tokens}; send fewer levels or a narrower window")
    if not worker.loaded.supports_trees:
        # An engine without tree attention verifies the best candidate as a chain; the window
        # stands still (no next level), so lookahead degrades to prompt lookup there.
        chain = candidates[0] if candidates else []
        verdict = yield from worker.verify_op(committed_len, [pending, *chain], None)
        return LookaheadResult(verdict, [])
    logits, hidden = yield Forward(worker.kv, layout.tokens, logits_for=len(layout.tokens), hidden=worker.return_hidden_states,
                                   positions=layout.positions, visible=layout.visible)  # [n, V], [n, H]
    next_level = logits[layout.top_rows].argmax(-1).tolist()
    sampling = worker.sampling

    def target_at(row: int) -> torch.Tensor:
        return logits[row] if sampling.greedy else warp(logits[row], sampling)  # [V]

    verdict, path = verify_candidates(target_at, candidates, layout.candidate_rows,
                                      None if sampling.greedy else worker.generator)
    kept = [0, *path]  # the pending token and the accepted candidate tokens
    worker.kv.keep(committed_len, kept)
    if worker.return_hidden_states:
        worker.last_hidden_states = hidden[kept]  # [1 + accepted, H]
    return LookaheadResult(verdict, next_level)


def unflatten(window: int, window_tokens: list[int], candidate_tokens: list[int], candidate_lengths: list[int]
              ) -> tuple[list[list[int]], list[list[int]]]:
    """(levels, candidates) from the flat form a lookahead op travels in, its sizes checked."""
    width, flat = window, list(window_tokens)
    if not 1 <= width <= MAX_WINDOW:
        raise InvalidArgument(f"window: must be in [1, {MAX_WINDOW}], got {width}")
    if not flat or len(flat) % width or len(flat) // width > MAX_NGRAM - 1:
        raise InvalidArgument(f"window_tokens: expected 1 to {MAX_NGRAM - 1} levels of window={width} tokens, got {len(flat)} tokens")
    levels = [flat[i : i + width] for i in range(0, len(flat), width)]
    lengths, flat = list(candidate_lengths), list(candidate_tokens)
    if sum(lengths) != len(flat):
        raise InvalidArgument(f"candidate_lengths: they sum to {sum(lengths)} but candidate_tokens holds {len(flat)} tokens")
    if len(lengths) > MAX_GUESSES or any(not 1 <= n <= MAX_CANDIDATE_TOKENS for n in lengths):
        raise InvalidArgument(f"candidate_lengths: at most {MAX_GUESSES} candidates of 1 to {MAX_CANDIDATE_TOKENS} tokens each")
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    candidates = [flat[s : s + n] for s, n in zip(starts, lengths)]
    return levels, candidates


def _check_shape(levels: list[list[int]], candidates: list[list[int]]) -> None:
    if not levels:
        raise InvalidArgument("window: at least one level of the lookahead window is needed")
    width = len(levels[0])
    if not 1 <= width <= MAX_WINDOW:
        raise InvalidArgument(f"window: must be in [1, {MAX_WINDOW}], got {width}")
    if len(levels) > MAX_NGRAM - 1 or any(len(level) != width for level in levels):
        raise InvalidArgument(f"window_tokens: expected at most {MAX_NGRAM - 1} full levels of {width} tokens")
    if len(candidates) > MAX_GUESSES:
        raise InvalidArgument(f"candidate_lengths: at most {MAX_GUESSES} candidates, got {len(candidates)}")
    for candidate in candidates:
        if not 1 <= len(candidate) <= MAX_CANDIDATE_TOKENS:
            raise InvalidArgument(f"candidate_lengths: each candidate holds 1 to {MAX_CANDIDATE_TOKENS} tokens")
