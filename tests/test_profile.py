"""Cost profiles: measured on tiny models, cached per machine, served by GetInfo, and the
controller driving the real decode loop without changing its output."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specserve.core.controller import CostPoint, CostProfile, CostTable, SpeculationController, speculation_policy
from specserve.core.proposers import PromptLookupProposer
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, decode
from specserve.runtime.local import LocalDraftProposer, LocalTargetSession, local_draft_proposer
from specserve.loading import load_model
from specserve.runtime.profile import CHAIN_TOKENS, LEVEL_WIDTHS, TREE_TOKENS, load_or_measure, profile_for, subject_for
from specserve.serving import cost_profile
from specserve.v1 import draft_pb2_grpc, model_service_pb2, target_pb2_grpc


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    return tmp_path


def test_a_target_profile_covers_chains_and_trees_and_is_cached(tiny_target, cache):
    measured = profile_for(tiny_target, "target")
    chain, tree = measured.costs.verify_chain, measured.costs.verify_tree
    contexts = chain.contexts()
    assert len(contexts) == 2 and max(contexts) + max(CHAIN_TOKENS) < tiny_target.max_context_tokens  # within the window
    assert sorted({p.new_tokens for p in chain.points}) == list(CHAIN_TOKENS)
    assert sorted({p.new_tokens for p in tree.points}) == list(TREE_TOKENS)
    assert measured.costs.draft_step is None
    assert all(p.ms > 0 and p.bytes_read > 0 and p.flops > 0 for p in chain.points + tree.points)
    # FLOPs grow with the tokens of a forward; bytes read barely (the weights dominate).
    by_k = {p.new_tokens: p for p in chain.points if p.context_tokens == contexts[0]}
    assert by_k[64].flops > 32 * by_k[1].flops and by_k[64].bytes_read < 2 * by_k[1].bytes_read
    assert measured.memory_gb_s > 0 and measured.matmul_gflop_s > 0 and not measured.from_cache
    again = profile_for(tiny_target, "target")
    assert again.from_cache and again.costs == measured.costs
    assert len(list((cache / "profiles").glob("target-*.json"))) == 1


def test_a_cache_entry_is_per_dtype_and_role(tiny_target_dir, cache):
    profile_for(load_model(str(tiny_target_dir), "float32"), "target")
    profile_for(load_model(str(tiny_target_dir), "bfloat16"), "target")
    profile_for(load_model(str(tiny_target_dir), "float32"), "draft")
    assert len(list((cache / "profiles").glob("*.json"))) == 3


def test_draft_profiles_measure_a_step_and_tree_levels(tiny_target, feature_draft, cache):
    for loaded in (tiny_target, feature_draft):  # a token draft and a feature draft
        costs = profile_for(loaded, "draft").costs
        assert costs.verify_chain is None
        assert {p.new_tokens for p in costs.draft_step.points} == {1}
        if loaded is feature_draft:  # only feature drafts draft trees
            assert sorted({p.new_tokens for p in costs.draft_tree_level.points}) == list(LEVEL_WIDTHS)
        else:
            assert costs.draft_tree_level is None


def test_an_unreadable_cache_entry_is_measured_again(tiny_target, cache):
    subject = subject_for(tiny_target, "target")
    first = load_or_measure(subject)
    for path in (cache / "profiles").glob("*.json"):
        path.write_text("{not json")
    second = load_or_measure(subject)
    assert not second.from_cache and second.costs.verify_chain is not None and first.costs.verify_chain is not None


def test_get_info_reports_each_services_profile(tiny_stack):
    for address, stub_class, table in ((tiny_stack.target_address, target_pb2_grpc.TargetServiceStub, "verify_chain"),
                                       (tiny_stack.draft_address, draft_pb2_grpc.DraftServiceStub, "draft_step")):
        with grpc.insecure_channel(address) as channel:
            info = stub_class(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=5)
        assert info.HasField("cost_profile")
        profile = info.cost_profile
        assert getattr(profile, table) and profile.cpu and profile.threads == 1 and profile.memory_gb_s > 0
        costs = cost_profile.from_proto(profile)
        assert getattr(costs, table).ms(1, 100) > 0


def test_profiles_survive_the_wire(tiny_target, cache):
    measured = profile_for(tiny_target, "target")
    assert cost_profile.from_proto(cost_profile.to_proto(measured)) == measured.costs


def _flat_or_steep(steep: bool) -> CostProfile:
    table = CostTable.of(CostPoint(c, k, 10.0 * k if steep else 10.0) for c in (1, 1000) for k in (1, 2, 4, 8, 16, 32, 64))
    return CostProfile(verify_chain=table, verify_tree=table)


def _decode(target, proposer, prompt, policy, temperature=0.0, seed=0, max_new=40):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new, top_k=50 if temperature else 0)
    request = DecodeRequest(prompt, sampling, seed, frozenset(), target.max_context_tokens, policy)

    async def collect():
        return [t async for c in decode(LocalTargetSession(target), proposer, request) for t in c.tokens]

    return asyncio.run(collect()), request.stats


PROMPT = [1, 504, 3000, 77, 504, 3000, 77, 504]


@pytest.mark.parametrize("steep", [False, True])
def test_the_controller_keeps_greedy_output_exact(tiny_target, tiny_draft_dir, feature_draft, steep):
    tiny_draft = load_model(str(tiny_draft_dir), "float32")
    plain, _ = _decode(tiny_target, None, PROMPT, None)
    for proposer, tree_nodes in ((PromptLookupProposer(), 0), (LocalDraftProposer(tiny_draft), 0),
                                 (LocalDraftProposer(tiny_target), 0)):
        policy = speculation_policy(_flat_or_steep(steep), None, k=4, k_max=16, fixed=False, tree_nodes=tree_nodes)
        tokens, stats = _decode(tiny_target, proposer, PROMPT, policy)
        assert tokens == plain
    # The target drafting for itself accepts everything: with flat costs the controller goes deep.
    policy = SpeculationController(_flat_or_steep(False), None)
    _, stats = _decode(tiny_target, LocalDraftProposer(tiny_target), PROMPT, policy)
    assert stats.decode_steps <= 8


def test_the_controller_chooses_tree_budgets_and_stays_exact(tiny_target, feature_draft):
    from specserve.core.tree import TreeShape

    plain, _ = _decode(tiny_target, None, PROMPT, None)
    proposer = local_draft_proposer(feature_draft, TreeShape(nodes=16))
    policy = speculation_policy(_flat_or_steep(False), None, k=4, k_max=8, fixed=False, tree_nodes=16)
    tokens, stats = _decode(tiny_target, proposer, PROMPT, policy)
    assert tokens == plain and stats.proposed_tokens > 0


def test_steep_costs_decode_mostly_plainly(tiny_target):
    policy = SpeculationController(_flat_or_steep(True), None)
    _, stats = _decode(tiny_target, LocalDraftProposer(tiny_target), PROMPT, policy, max_new=60)
    assert stats.decode_steps >= 40  # plain steps, with a short probe now and then


def test_seeded_sampling_with_the_controller_is_reproducible(tiny_target, tiny_draft_dir):
    tiny_draft = load_model(str(tiny_draft_dir), "float32")
    runs = []
    for _ in range(2):
        policy = speculation_policy(_flat_or_steep(False), None, k=4, k_max=16, fixed=False)
        runs.append(_decode(tiny_target, LocalDraftProposer(tiny_draft), PROMPT, policy, temperature=0.8, seed=7)[0])
    assert runs[0] == runs[1]
