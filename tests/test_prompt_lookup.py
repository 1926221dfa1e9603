"""Prompt lookup matching on tiny arrays."""

from __future__ import annotations

import asyncio

from specserve.core.prompt_lookup import find_continuation
from specserve.core.proposers import PromptLookupProposer


def test_longest_suffix_match_wins():
    # Suffix [2, 3] matches at index 1 (trigram [1, 2, 3] too); continuation is 4, 5.
    assert find_continuation([1, 2, 3, 4, 5, 9, 1, 2, 3], k=2) == [4, 5]


def test_most_recent_occurrence_wins():
    tokens = [7, 8, 1, 7, 8, 2, 7, 8]
    assert find_continuation(tokens, k=1, max_ngram=2) == [2]


def test_shorter_ngram_is_used_when_longer_fails():
    # Trigram [5, 6, 3] and bigram [6, 3] never occurred before; unigram [3] did.
    assert find_continuation([3, 9, 9, 5, 6, 3], k=2) == [9, 9]


def test_min_ngram_limits_weak_matches():
    assert find_continuation([3, 9, 9, 5, 6, 3], k=2, min_ngram=2) == []


def test_continuation_is_cut_at_k_and_at_the_end():
    assert find_continuation([1, 2, 3, 1, 2], k=10) == [3, 1, 2]
    assert find_continuation([1, 2, 3, 1, 2], k=1) == [3]


def test_no_match_and_degenerate_inputs():
    assert find_continuation([1, 2, 3, 4], k=3) == []
    assert find_continuation([], k=3) == []
    assert find_continuation([5], k=3) == []
    assert find_continuation([5, 5], k=0) == []


def test_the_suffix_itself_is_not_a_match():
    # [4, 4] ends the sequence; its earlier occurrence starts at 0 and is followed by 4.
    assert find_continuation([4, 4, 4], k=3, max_ngram=2) == [4]


def test_proposer_prefers_the_fallback_over_weak_local_matches():
    asked = []

    async def pool(sequence, k):
        asked.append(tuple(sequence[-3:]))
        return [42, 43][:k]

    proposer = PromptLookupProposer(fallback=pool)
    # Only a unigram match exists locally: the pool is asked first and wins.
    assert asyncio.run(proposer.propose([3, 9, 9, 5, 6, 3], 2)).tokens == [42, 43]
    # A trigram match exists locally: the pool is not asked.
    asked.clear()
    assert asyncio.run(proposer.propose([1, 2, 3, 4, 1, 2, 3], 2)).tokens == [4, 1]
    assert asked == []
