"""The request planner (specserve.generation.plan): which proposer, policy and loop each job
gets, on stand-in sessions (no model, no gRPC)."""

from __future__ import annotations

import pytest

from specserve.core.controller import CostPoint, CostProfile, CostTable
from specserve.core.medusa_proposer import ColocatedMedusaProposer
from specserve.core.proposers import PromptLookupProposer, WithLookupBranch
from specserve.core.sampling import SamplingConfig
from specserve.generation.plan import Serving, plan
from specserve.generation.requests import Job, Limits
from specserve.v1 import orchestrator_pb2 as pb

GREEDY = SamplingConfig(max_new_tokens=8)
SAMPLED = SamplingConfig(temperature=0.8, max_new_tokens=8)


class TokenDraft:
    """Stands for a token draft's proposer (it can draft ahead: it has `speculate`)."""

    needs_target_hidden_states = False
    forward_passes = 0
    last_compute_ms = 0.0

    def __init__(self, tree):
        self.tree = tree

    async def speculate(self, *args, **kwargs):
        raise AssertionError("not run here")


class FeatureDraft(TokenDraft):
    needs_target_hidden_states = True


def serving(draft=TokenDraft, **kwargs) -> Serving:
    return Serving(open_target=object, open_draft=draft, eos_token_ids=frozenset({0}), max_context_tokens=512, **kwargs)


def job(method, k=0, sampling=GREEDY, **kwargs) -> Job:
    return Job([1, 2, 3], sampling, None, method, k, False, **kwargs)


def loop(run) -> str:
    return run.steps.ag_code.co_name


def flat_costs(ms: float) -> CostProfile:
    table = CostTable.of([CostPoint(100, n, ms) for n in (1, 2, 4, 8, 16, 32)])
    return CostProfile(verify_chain=table, draft_step=table)


def test_each_method_gets_its_proposer_and_loop():
    limits = Limits()
    plain = plan(job(pb.AUTOREGRESSIVE), limits, serving())
    assert plain.proposer is None and plain.decoding.speculation is None and loop(plain) == "decode"
    lookup = plan(job(pb.PROMPT_LOOKUP, k=8), limits, serving())
    assert isinstance(lookup.proposer, PromptLookupProposer) and lookup.decoding.speculation is not None
    drafted = plan(job(pb.DRAFT_MODEL, k=4), limits, serving())
    assert isinstance(drafted.proposer, TokenDraft) and loop(drafted) == "decode" and drafted.ahead is None
    medusa = plan(job(pb.MEDUSA, k=3, medusa="options"), limits, serving())
    assert isinstance(medusa.proposer, ColocatedMedusaProposer) and medusa.proposer.target_options == "options"
    lookahead = plan(job(pb.LOOKAHEAD, lookahead=limits.lookahead), limits, serving())
    assert lookahead.proposer is None and loop(lookahead) == "decode_lookahead"


def test_a_feature_draft_drafts_trees_with_a_lookup_branch():
    limits = Limits(tree_nodes=16)
    run = plan(job(pb.DRAFT_MODEL, k=4, tree_nodes=16), limits, serving(FeatureDraft, draft_needs_target_hidden_states=True))
    assert isinstance(run.proposer, WithLookupBranch)
    assert run.proposer.inner.tree == limits.tree_shape(16)


def test_drafting_ahead_and_why_not():
    limits = Limits()
    ahead = plan(job(pb.DRAFT_MODEL, k=4, async_draft="on", async_draft_asked=True), limits, serving())
    assert loop(ahead) == "decode_ahead" and ahead.ahead is not None and ahead.synchronous_reason == ""
    shared = plan(job(pb.DRAFT_MODEL, k=4, async_draft="auto"), limits, serving(shared_cores=True))
    assert loop(shared) == "decode" and "share its cores" in shared.synchronous_reason
    sampled = plan(job(pb.DRAFT_MODEL, k=4, sampling=SAMPLED, async_draft="on"), limits, serving())
    assert loop(sampled) == "decode" and "sampled" in sampled.synchronous_reason
    feature = plan(job(pb.DRAFT_MODEL, k=4, async_draft="on"), limits,
                   serving(FeatureDraft, draft_needs_target_hidden_states=True))
    assert "feature draft" in feature.synchronous_reason
    other = plan(job(pb.PROMPT_LOOKUP, k=8, async_draft="on", async_draft_asked=True), limits, serving())
    assert "DRAFT_MODEL" in other.synchronous_reason


def test_policy_follows_the_costs_and_the_server_setting():
    costs = flat_costs(20.0)
    controlled = plan(job(pb.PROMPT_LOOKUP, k=8), Limits(), serving(target_costs=costs))
    blind = plan(job(pb.PROMPT_LOOKUP, k=8), Limits(speculation_control="adaptive"), serving(target_costs=costs))
    assert type(controlled.decoding.speculation).__name__ == "SpeculationController"
    assert type(blind.decoding.speculation).__name__ == "SpeculationLength"


def test_a_missing_draft_fails_before_any_session_opens():
    opened = []

    def no_draft(tree):
        raise ValueError("no draft")

    with pytest.raises(ValueError, match="no draft"):
        plan(job(pb.DRAFT_MODEL, k=4), Limits(), Serving(open_target=lambda: opened.append(1), open_draft=no_draft,
                                                         eos_token_ids=frozenset(), max_context_tokens=512))
    assert opened == []
