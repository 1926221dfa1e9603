"""Lookahead decoding: window, pool, layout and acceptance on tiny arrays; the masked forward
against plain forwards and the whole loop against plain decoding on a tiny model, in process."""

from __future__ import annotations

import asyncio

import pytest
import torch

from specserve.core.lookahead import (CandidatePool, JacobiWindow, LookaheadShape, build_layout, select_candidates,
                                      verify_candidates)
from specserve.core.lookahead_decode import decode_lookahead
from specserve.core.ngram_pool import InMemoryNgramPool, record_sequence
from specserve.core.sampling import SamplingConfig, make_generator
from specserve.core.speculate import DecodeRequest
from specserve.runtime.local import LocalTargetSession
from conftest import plain_greedy


def test_shape_is_validated():
    with pytest.raises(ValueError, match="ngram"):
        LookaheadShape(window=3, ngram=1, guesses=2)
    with pytest.raises(ValueError, match="window"):
        LookaheadShape(window=0)


def test_window_fills_then_harvests_column_ngrams():
    window = JacobiWindow(LookaheadShape(window=2, ngram=3, guesses=1), prompt=[9], seed=0)
    assert window.levels == [[9, 9]]
    assert window.update([1, 2]) == []  # warming up: a second level
    assert window.levels == [[9, 9], [1, 2]]
    assert window.update([3, 4]) == [(9, 1, 3), (9, 2, 4)]  # full: column i with its new token
    assert window.levels == [[1, 2], [3, 4]]


def test_candidate_pool_is_bounded_and_most_recent_first():
    pool = CandidatePool(per_key=2, max_keys=2)
    for ngram in ([1, 2, 3], [1, 4, 5], [1, 6, 7], [1, 4, 5]):
        pool.add(ngram)
    assert pool.get(1) == [(4, 5), (6, 7)]  # most recent first, repeats once, 2 per key
    pool.add([2, 9])
    pool.add([3, 9])
    assert pool.get(1) == [] and pool.get(2) == [(9,)]  # 2 keys: the least recently written went
    pool.add_sequence([5, 6, 7, 8], n=3)
    assert pool.get(5) == [(6, 7)] and pool.get(6) == [(7, 8)]


def test_select_candidates_dedupes_and_cuts():
    chosen = select_candidates([[[1, 2, 3, 4]], [[1, 2], [1, 2, 3, 4], [5], []], [[6, 7]]], guesses=3, max_len=3)
    assert chosen == [[1, 2, 3], [5], [6, 7]]  # [1, 2] is a prefix of a chosen one


def test_layout_mask_and_positions():
    layout = build_layout(10, 99, [[1, 2, 3], [4, 5, 6]], [[7, 8]])
    assert layout.tokens == [99, 1, 2, 3, 4, 5, 6, 7, 8]
    assert layout.positions == [10, 11, 12, 13, 12, 13, 14, 11, 12]
    assert layout.top_rows == [4, 5, 6] and layout.candidate_rows == [[7, 8]]
    # Each row sees a contiguous run of positions 10 .. its own, one token each.
    for row in range(len(layout.tokens)):
        seen = sorted(layout.positions[j] for j in torch.nonzero(layout.visible[row]).flatten().tolist())
        assert seen == list(range(10, layout.positions[row] + 1)), row
    # Level 1, column 2 (token 6) reads level 0's columns 0..2 and itself: positions 11..14.
    assert torch.nonzero(layout.visible[6]).flatten().tolist() == [0, 1, 2, 3, 6]


def logits_for(choices: dict[int, int], vocab: int = 10):
    """target_at for verify_candidates: row -> one-hot-ish logits picking choices[row]."""
    def target_at(row: int) -> torch.Tensor:
        logits = torch.zeros(vocab)
        logits[choices[row]] = 5.0
        return logits
    return target_at


def test_greedy_verification_takes_the_longest_agreeing_candidate():
    candidates = [[3, 4, 9], [3, 5, 6], [2]]
    rows = [[1, 2, 3], [4, 5, 6], [7]]
    # The target says 3 after the pending token, 5 after (3), 6 after (3, 5), 8 after (3, 5, 6).
    verdict, path = verify_candidates(logits_for({0: 3, 1: 5, 4: 5, 5: 6, 6: 8}), candidates, rows, None)
    assert (verdict.accepted, verdict.tokens, path) == (3, [3, 5, 6, 8], [4, 5, 6])
    verdict, path = verify_candidates(logits_for({0: 1}), candidates, rows, None)
    assert (verdict.accepted, verdict.tokens, path) == (0, [1], [])


P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])  # [V] the target at the pending token
# The target after each first token: a different row per token.
P_AFTER = {t: torch.roll(torch.tensor([0.05, 0.05, 0.10, 0.20, 0.30, 0.30]), t) for t in range(6)}
TRIALS = 20000
TV_BOUND = 0.025  # sampling noise in TV distance at 20k trials over 6 outcomes is ~0.01


def total_variation(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - expected).abs().sum())


def sampled_counts(candidates, seed=0):
    """Counts of the first token, and of the second given the first, over many sampled steps."""
    rows = [[1 + 2 * g, 2 + 2 * g] for g in range(len(candidates))]
    first_of_row = {r[0]: c[0] for c, r in zip(candidates, rows)}
    generator = make_generator(seed)
    first = torch.zeros(6)
    second = {t: torch.zeros(6) for t in P_AFTER}

    def target_at(row: int) -> torch.Tensor:
        return P_AFTER[first_of_row[row]] if row in first_of_row else P  # deeper rows: any distribution

    for _ in range(TRIALS):
        verdict, _ = verify_candidates(target_at, candidates, rows, generator)
        first[verdict.tokens[0]] += 1
        if len(verdict.tokens) > 1 and verdict.tokens[0] in second:
            second[verdict.tokens[0]][verdict.tokens[1]] += 1
    return first, second


@pytest.mark.parametrize("candidates", [[[4, 3]], [[0, 5], [1, 2], [0, 3]], [[5, 0], [4, 1], [3, 2], [2, 3]]])
def test_sampled_verification_reproduces_the_target_distribution(candidates):
    first, second = sampled_counts(candidates)
    assert total_variation(first, P) < TV_BOUND
    for token, counts in second.items():
        if counts.sum() > 2000:  # given the first token, the second follows the target's row after it
            assert total_variation(counts, P_AFTER[token]) < 0.04


def test_a_broken_multi_candidate_rule_is_detected():
    """Accepting each candidate with probability p(x) without renormalising what is left (a
    classic mistake) skews the output by far more than the bound above."""
    generator = make_generator(1)
    counts = torch.zeros(6)
    for _ in range(TRIALS):
        for token in (0, 1, 2):
            if torch.rand((), generator=generator) < P[token]:
                counts[token] += 1
                break
        else:
            residual = P.clone()
            residual[[0, 1, 2]] = 0
            counts[int(torch.multinomial(residual, 1, generator=generator))] += 1
    assert total_variation(counts, P) > TV_BOUND


@torch.inference_mode()
def test_masked_forward_matches_plain_forwards(tiny_target):
    """Every window and candidate row's logits equal a plain causal forward over the chain of
    tokens its mask lets it see (positions included)."""
    from specserve.runtime.kv import KVSession

    prefix, pending = [5, 17, 300, 42], 77
    levels, candidates = [[11, 12, 13], [21, 22, 23], [31, 32, 33]], [[41, 42], [51]]
    layout = build_layout(len(prefix), pending, levels, candidates)
    session = KVSession(tiny_target.model)
    session.extend(prefix)
    out = session.extend_masked(layout.tokens, layout.positions, layout.visible).logits[0]  # [n, V]
    for row in range(len(layout.tokens)):
        chain = [layout.tokens[j] for j in torch.nonzero(layout.visible[row]).flatten().tolist()]
        chain = [t for _, t in sorted(zip([layout.positions[j] for j in torch.nonzero(layout.visible[row]).flatten().tolist()], chain))]
        plain = tiny_target.model(torch.tensor([prefix + chain])).logits[0, -1]  # [V]
        torch.testing.assert_close(out[row], plain, atol=1e-4, rtol=1e-4)


def run_lookahead(target, prompt, shape, temperature=0.0, seed=0, max_new=40, shared=None):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new, top_k=50 if temperature else 0)
    request = DecodeRequest(prompt, sampling, seed, frozenset(), target.max_context_tokens)

    async def collect():
        return [t async for chunk in decode_lookahead(LocalTargetSession(target), request, shape, shared) for t in chunk.tokens]

    return asyncio.run(collect()), request.stats


PROMPTS = [[1, 5, 9, 200, 7, 5, 9, 200, 7, 5], [3, 1000, 2000, 3000, 4000, 3, 1000], [8]]


@pytest.mark.parametrize("shape", [LookaheadShape(1, 2, 1), LookaheadShape(4, 3, 4), LookaheadShape(5, 5, 8),
                                   LookaheadShape(3, 4, 0)])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_lookahead_equals_plain_decoding(tiny_target, prompt, shape):
    tokens, stats = run_lookahead(tiny_target, prompt, shape)
    assert tokens == plain_greedy(tiny_target, prompt, 40)
    assert stats.generated_tokens == 40 and stats.decode_steps < 40 + 1
    assert stats.target_forward_passes == stats.decode_steps + 1


def test_a_pool_of_garbage_changes_nothing_but_a_pool_of_the_answer_speeds_up(tiny_target):
    prompt = PROMPTS[1]
    shape = LookaheadShape(3, 4, 4)
    plain = plain_greedy(tiny_target, prompt, 40)
    garbage = InMemoryNgramPool()
    for token in range(0, 49152, 7):
        garbage.put((token,), [token + 1, token + 2, token + 3])
    record_sequence(garbage, [1, 2, 3] * 50)
    tokens, _ = run_lookahead(tiny_target, prompt, shape, shared=garbage)
    assert tokens == plain
    knows = InMemoryNgramPool()
    record_sequence(knows, prompt + plain)
    tokens, stats = run_lookahead(tiny_target, prompt, shape, shared=knows)
    assert tokens == plain
    assert stats.mean_accepted_length > 3  # the pool hands over the answer in long runs


def test_sampled_lookahead_is_reproducible_and_plausible(tiny_target):
    shape = LookaheadShape(4, 3, 4)
    a, _ = run_lookahead(tiny_target, PROMPTS[0], shape, temperature=0.8, seed=3)
    b, _ = run_lookahead(tiny_target, PROMPTS[0], shape, temperature=0.8, seed=3)
    c, _ = run_lookahead(tiny_target, PROMPTS[0], shape, temperature=0.8, seed=4)
    assert a == b and len(a) == 40 and a != c


def test_lookahead_near_the_end_of_the_context(tiny_target):
    """The window is cut when it would reach past the context window; output stays exact."""
    prompt = list(range(100, 100 + tiny_target.max_context_tokens - 12))
    tokens, _ = run_lookahead(tiny_target, prompt, LookaheadShape(8, 5, 4), max_new=40)
    assert len(tokens) == 12 and tokens == plain_greedy(tiny_target, prompt, 12)


def test_sampled_lookahead_step_follows_the_target_distribution(tiny_target):
    """Through the target's whole step (mask, rows, acceptance): the token after the pending one
    is distributed as the target's warped distribution there, whatever the candidates."""
    from specserve.core.sampling import warp
    from specserve.runtime.lookahead_worker import lookahead_step
    from specserve.runtime.workers import TargetWorker

    prompt, pending = [1, 5, 9, 200], 7
    sampling = SamplingConfig(temperature=0.7, top_k=5)
    with torch.inference_mode():
        expected = warp(tiny_target.model(torch.tensor([prompt + [pending]])).logits[0, -1], sampling)  # [V]
    top = torch.topk(expected, 5).indices.tolist()
    candidates = [[top[0], 3, 4], [top[1]], [top[0], 8], [top[3], 2]]
    counts = torch.zeros_like(expected)
    worker = TargetWorker(tiny_target)
    worker.start(prompt, sampling, seed=0)
    trials = 1200
    for trial in range(trials):
        # The same step again, as another request's (an op's draws are keyed by seed and position).
        worker.seed = trial
        result = lookahead_step(worker, len(prompt), pending, [[11, 12, 13]], candidates)
        counts[result.verdict.tokens[0]] += 1
        assert worker.kv.length == len(prompt) + 1 + result.verdict.accepted
        worker.kv.rollback(len(prompt))
    assert total_variation(counts, expected) < 0.06  # noise at 1.2k trials over 5 outcomes: ~0.025


class BusyTarget(LocalTargetSession):
    """A target whose every pass also carried `other` tokens of other sessions (what a batching
    target reports), recording the window levels each step sent."""

    def __init__(self, target, other: int):
        super().__init__(target)
        self.other, self.sent_levels = other, []

    async def lookahead(self, committed_len, pending, levels, candidates):
        self.sent_levels.append(sum(map(len, levels)))
        self.last_batch_tokens = self.other + 1 + sum(map(len, levels)) + sum(map(len, candidates))
        return await super().lookahead(committed_len, pending, levels, candidates)


def test_under_load_the_window_stands_still_and_output_stays_exact(tiny_target):
    from specserve.core.controller import CostPoint, CostTable

    # Flat to 16 tokens, then 10 ms per token: past 300 other tokens a window row costs 10 ms, alone far less.
    knee = CostTable.of(CostPoint(c, k, 40.0 + 0.5 * k if k <= 16 else 48.0 + 10.0 * (k - 16))
                        for c in (128, 1024) for k in (1, 2, 4, 8, 16, 32, 64))
    flat = CostTable.of(CostPoint(c, k, 40.0 + 0.05 * k) for c in (128, 1024) for k in (1, 2, 4, 8, 16, 32, 64))
    shape = LookaheadShape(5, 4, 5)
    prompt = PROMPTS[0]
    plain = plain_greedy(tiny_target, prompt, 40)

    def run(table, other):
        target = BusyTarget(tiny_target, other)
        request = DecodeRequest(prompt, SamplingConfig(max_new_tokens=40), 0, frozenset(), tiny_target.max_context_tokens)

        async def collect():
            return [t async for chunk in decode_lookahead(target, request, shape, None, table) for t in chunk.tokens]

        return asyncio.run(collect()), target.sent_levels

    busy, sent = run(knee, 300)
    assert busy == plain
    assert sent[0] == 5 and set(sent[1:]) == {1}  # the first level until the load is seen, then one token
    _, sent = run(flat, 300)
    assert 1 not in sent and max(sent) == 15  # on a flat curve the window grows and goes, load or not
    alone, sent = run(knee, 0)
    assert alone == plain and 1 not in sent and max(sent) == 15
