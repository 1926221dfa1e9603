"""Acceptance rules: greedy cases, and rejection sampling reproducing the target distribution."""

from __future__ import annotations

import pytest
import torch

from specserve.core.acceptance import accept_greedy, accept_rejection_sampling
from specserve.core.distributions import to_dense, to_sparse
from specserve.core.sampling import make_generator


def one_hot_logits(choices: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(choices), vocab)  # [k+1, V]
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 5.0
    return logits


@pytest.mark.parametrize(
    "choices, proposal, accepted, tokens",
    [
        ([3, 4, 5, 6], [3, 4, 5], 3, [3, 4, 5, 6]),  # all accepted, bonus token 6
        ([3, 4, 5, 6], [3, 1, 5], 1, [3, 4]),  # rejected at 1: recovered token 4
        ([3, 4, 5, 6], [0, 4, 5], 0, [3]),  # first rejected: plain decoding's token
        ([7], [], 0, [7]),  # no proposal: one plain step
    ],
)
def test_greedy_acceptance(choices, proposal, accepted, tokens):
    verdict = accept_greedy(one_hot_logits(choices), proposal)
    assert verdict.accepted == accepted
    assert verdict.tokens == tokens


# Target and draft distributions over a small vocabulary, deliberately different.
P = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04], [0.05, 0.05, 0.10, 0.20, 0.30, 0.30]])  # [2, V]
Q = torch.tensor([0.10, 0.10, 0.10, 0.10, 0.30, 0.30])  # [V]
TRIALS = 20000


def first_token_counts(draw_draft, draft_probs_for, trials: int = TRIALS, seed: int = 0) -> torch.Tensor:
    """How often each token comes out first from one speculative step with one proposal."""
    generator = make_generator(seed)
    counts = torch.zeros(P.shape[1])
    for _ in range(trials):
        token = draw_draft(generator)
        verdict = accept_rejection_sampling(P, [token], draft_probs_for(token), generator)
        counts[verdict.tokens[0]] += 1
    return counts


def total_variation(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - expected).abs().sum())


# With 20k trials and 6 outcomes the sampling noise in TV distance is ~0.01; every
# broken rule checked below is off by > 0.1.
TV_BOUND = 0.025


def test_rejection_sampling_reproduces_target_distribution():
    counts = first_token_counts(lambda g: int(torch.multinomial(Q, 1, generator=g)), lambda t: Q[None, :])
    assert total_variation(counts, P[0]) < TV_BOUND
    # The test can fail: the draft's own distribution is far from the target's.
    assert total_variation(counts, Q) > 0.2


def test_chi_square_against_target():
    from scipy.stats import chisquare

    counts = first_token_counts(lambda g: int(torch.multinomial(Q, 1, generator=g)), lambda t: Q[None, :], seed=1)
    assert chisquare(counts.numpy(), (P[0] * TRIALS).numpy()).pvalue > 1e-4


def test_a_broken_rule_is_detected():
    """A classic bug, recovering from p instead of normalize(max(p - q, 0)), skews the
    output by a total variation of 0.125; the bound used above catches it."""
    generator = make_generator(2)
    counts = torch.zeros(P.shape[1])
    for _ in range(TRIALS):
        token = int(torch.multinomial(Q, 1, generator=generator))
        if torch.rand((), generator=generator) < P[0, token] / Q[token]:
            counts[token] += 1
        else:
            counts[int(torch.multinomial(P[0], 1, generator=generator))] += 1
    assert total_variation(counts, P[0]) > TV_BOUND


def test_deterministic_proposer_is_lossless():
    """Prompt lookup proposes with probability 1: q is one-hot, passed as None."""
    counts = first_token_counts(lambda g: 4, lambda t: None)
    assert total_variation(counts, P[0]) < TV_BOUND


def test_restricted_vocabulary_draft_is_lossless():
    """A draft whose head covers only tokens {0, 3, 4} sends exact sparse rows."""
    vocab_ids = torch.tensor([0, 3, 4])
    q_restricted = torch.tensor([0.2, 0.5, 0.3])  # over vocab_ids
    row = to_sparse(q_restricted, vocab_ids)
    dense = to_dense([row], P.shape[1])  # [1, V]
    assert dense[0].tolist() == pytest.approx([0.2, 0, 0, 0.5, 0.3, 0])

    def draw(generator):
        return int(vocab_ids[torch.multinomial(q_restricted, 1, generator=generator)])

    counts = first_token_counts(draw, lambda t: dense)
    # Tokens 1, 2 and 5 can only come from recovery, yet appear at the target's rates.
    assert total_variation(counts, P[0]) < TV_BOUND


def test_two_step_chain_matches_target_joint_distribution():
    """Two proposals: the first two output tokens follow the target's (independent) rows."""
    generator = make_generator(3)
    target = torch.cat([P, P[:1]])  # [3, V]: rows for d1, d2 and the bonus position
    first = torch.zeros(P.shape[1])
    second = torch.zeros(P.shape[1])
    q = Q[None, :].expand(2, -1)  # [2, V]
    for _ in range(TRIALS):
        proposal = torch.multinomial(Q, 2, replacement=True, generator=generator).tolist()
        tokens = accept_rejection_sampling(target, proposal, q, generator).tokens
        first[tokens[0]] += 1
        if len(tokens) >= 2:
            second[tokens[1]] += 1
    assert total_variation(first, P[0]) < TV_BOUND
    # A second token exists when the first proposal was accepted; given that, it is the
    # outcome of a fresh step at position 2 and must follow the target's second row.
    assert total_variation(second, P[1]) < 0.03


@pytest.mark.parametrize("temperature", [1.17549435e-38, 1e-30, 3.0e38])
def test_extreme_temperatures_give_a_distribution(temperature):
    """Found by fuzzing: a temperature near 0 made inf / inf = nan. Near 0 it is the argmax
    (one-hot); huge, it is uniform."""
    from specserve.core.sampling import SamplingConfig, warp

    logits = torch.tensor([[2.0, 5.0, -1.0, 5.0 - 1e-3]])  # [1, V]
    probs = warp(logits, SamplingConfig(temperature=temperature))  # [1, V]
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(1))
    if temperature < 1:
        assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    else:
        assert torch.allclose(probs, torch.full_like(probs, 0.25))
