"""The core loop in process: every method's greedy output equals plain decoding's (fp32)."""

from __future__ import annotations

import asyncio

import pytest

from specserve.core.adaptive import SpeculationLength
from specserve.core.proposers import PromptLookupProposer
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, DraftSequenceTracker, Finish, decode
from specserve.runtime.local import LocalDraftProposer, LocalTargetSession
from specserve.loading import load_model

PROMPTS = [[1, 504, 3000, 77, 504, 3000], [9, 9, 9, 9], list(range(100, 160))]


def run(target_model, proposer, prompt, k=None, fixed=True, temperature=0.0, seed=0, max_new=40, eos=frozenset()):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new, top_k=50 if temperature else 0)
    speculation = SpeculationLength(k, k_max=16, fixed=fixed) if k else None
    request = DecodeRequest(prompt, sampling, seed, eos, target_model.max_context_tokens, speculation)

    async def collect():
        chunks = [c async for c in decode(LocalTargetSession(target_model), proposer, request)]
        return [t for c in chunks for t in c.tokens], chunks[-1].finish

    tokens, finish = asyncio.run(collect())
    return tokens, finish, request.stats


@pytest.fixture(scope="module")
def tiny_draft(tiny_draft_dir):
    return load_model(str(tiny_draft_dir), "float32")


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculative_methods_equal_plain_decoding(tiny_target, tiny_draft, prompt, k):
    plain, finish, plain_stats = run(tiny_target, None, prompt, max_new=24)
    assert finish == Finish.LENGTH and len(plain) == 24
    assert plain_stats.target_forward_passes == 24  # the prefill yields the first token
    for proposer in (PromptLookupProposer(), LocalDraftProposer(tiny_draft), LocalDraftProposer(tiny_target)):
        tokens, _, stats = run(tiny_target, proposer, prompt, k=k, max_new=24)
        assert tokens == plain, type(proposer).__name__
        assert stats.generated_tokens == 24


def test_the_target_as_its_own_draft_accepts_everything(tiny_target):
    tokens, _, stats = run(tiny_target, LocalDraftProposer(tiny_target), PROMPTS[0], k=4)
    assert stats.accepted_tokens == stats.proposed_tokens
    assert stats.decode_steps == 8  # 39 tokens after the first, 5 per step
    assert stats.mean_accepted_length == pytest.approx(40 / 8)


def test_adaptive_length_keeps_output_exact(tiny_target, tiny_draft):
    plain, _, _ = run(tiny_target, None, PROMPTS[2])
    tokens, _, _ = run(tiny_target, LocalDraftProposer(tiny_draft), PROMPTS[2], k=4, fixed=False)
    assert tokens == plain


def test_eos_ends_generation_and_is_not_emitted(tiny_target):
    plain, _, _ = run(tiny_target, None, PROMPTS[0])
    eos = plain[10]
    first = plain.index(eos)
    for proposer, k in ((None, None), (LocalDraftProposer(tiny_target), 4)):
        tokens, finish, _ = run(tiny_target, proposer, PROMPTS[0], k=k, eos=frozenset({eos}))
        assert finish == Finish.EOS
        assert tokens == plain[:first]


def test_sampling_is_reproducible_with_a_seed(tiny_target, tiny_draft):
    a, _, _ = run(tiny_target, LocalDraftProposer(tiny_draft), PROMPTS[1], k=4, temperature=0.8, seed=7)
    b, _, _ = run(tiny_target, LocalDraftProposer(tiny_draft), PROMPTS[1], k=4, temperature=0.8, seed=7)
    c, _, _ = run(tiny_target, LocalDraftProposer(tiny_draft), PROMPTS[1], k=4, temperature=0.8, seed=8)
    assert a == b
    assert a != c


def test_speculation_length_adapts():
    length = SpeculationLength(4, k_min=1, k_max=7)
    length.update(4, 4)
    assert length.k == 6
    length.update(6, 6)
    assert length.k == 7
    for k in (6, 5, 4, 3, 2, 1):
        length.update(length.k, 1)
        assert length.k == k
    fixed = SpeculationLength(4, fixed=True)
    fixed.update(4, 0)
    assert fixed.k == 4


def test_speculation_pauses_longer_while_one_token_keeps_failing():
    length = SpeculationLength(1, k_min=1, max_pause=4)
    pauses = []
    for _ in range(4):
        length.update(1, 0)  # a single proposal rejected outright
        steps = 0
        while length.k == 0:
            length.update(0, 0)  # a plain-decoding step
            steps += 1
        pauses.append(steps)
    assert pauses == [1, 2, 4, 4]
    length.update(1, 1)  # accepted: speculation grows again and pauses reset
    assert length.k == 3
    length.update(3, 0)
    length.update(2, 0)
    length.update(1, 0)
    assert length.k == 0
    length.update(0, 0)
    assert length.k == 1


def test_draft_tracker_sends_only_the_difference():
    tracker = DraftSequenceTracker()
    tracker.reset([1, 2, 3])
    assert tracker.diff([1, 2, 3, 4]) == (3, [4])
    tracker.record([1, 2, 3, 4], [5, 6, 7])  # the draft now holds 1..7
    assert tracker.diff([1, 2, 3, 4, 5, 6, 9]) == (6, [9])  # 5, 6 accepted, 9 recovered
    assert tracker.diff([1, 2, 3, 4, 5, 6, 7, 8]) == (7, [8])  # all accepted, bonus 8
