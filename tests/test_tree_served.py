"""Trees through the served stack with the tiny feature draft: output, sampling, bad input."""

from __future__ import annotations

import grpc
import pytest
import torch

from specserve.client import build_request, connect, generate
from specserve.core.tree import MAX_TREE_NODES, DraftTree, TreeShape
from specserve.serving import hidden_states
from specserve.v1 import common_pb2, draft_pb2, draft_pb2_grpc, orchestrator_pb2 as pb, target_pb2, target_pb2_grpc
from conftest import plain_greedy, teacher_forced_hidden

PROMPTS = [[1, 504, 3000, 77, 504, 3000], list(range(100, 160))]
TEXT_PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "Once upon a time"]


@pytest.fixture(scope="module")
def stub(feature_stack):
    channel, stub = connect(feature_stack.address)
    yield stub
    channel.close()


def generation(stub, include_step_timings=True, **kwargs):
    kwargs.setdefault("max_new_tokens", 30)
    request = build_request(**kwargs)
    request.include_step_timings = include_step_timings
    return generate(stub, request, timeout_s=120)


@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_served_trees_equal_autoregressive(stub, prompt):
    plain = generation(stub, prompt=prompt, method="autoregressive")
    assert len(plain.token_ids) == 30
    for tree_nodes, k, fixed in ((None, 4, True), (None, 2, False), (0, 4, True), (1, 3, True), (5, 4, True), (MAX_TREE_NODES, 3, True)):
        result = generation(stub, prompt=prompt, method="draft_model", num_speculative_tokens=k, fixed_length=fixed,
                            tree_nodes=tree_nodes)
        assert result.token_ids == plain.token_ids, (tree_nodes, k, fixed)
        stats = result.stats
        assert stats.method == pb.DRAFT_MODEL and stats.proposed_tokens > 0
        assert stats.proposed_tokens == sum(s.proposed for s in stats.step_timings)
        most = max(s.proposed for s in stats.step_timings)
        nodes = TreeShape().nodes if tree_nodes is None else tree_nodes
        if nodes == 0:
            assert most <= k  # chains
        else:
            assert most <= nodes
            if nodes > k:
                assert most > k  # trees: more nodes than a chain of K could hold


def test_served_sampling_uses_chains_and_is_reproducible(stub):
    kwargs = dict(prompt=TEXT_PROMPTS[0], method="draft_model", temperature=0.9, top_p=0.95, seed=11,
                  num_speculative_tokens=3, fixed_length=True, tree_nodes=MAX_TREE_NODES)
    a, b = generation(stub, **kwargs), generation(stub, **kwargs)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    assert a.stats.proposed_tokens > 0 and all(s.proposed <= 3 for s in a.stats.step_timings)


def test_bad_tree_nodes_are_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as caught:
        generation(stub, prompt="Hi", method="draft_model", tree_nodes=MAX_TREE_NODES + 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("speculation.tree_nodes:"), caught.value.details()


def target_session(stack, ops):
    requests = [target_pb2.TargetRequest(op_id=i, **{"start" if i == 0 else "verify": op}) for i, op in enumerate(ops)]
    with grpc.insecure_channel(stack.target_address) as channel:
        return list(target_pb2_grpc.TargetServiceStub(channel).Session(iter(requests), timeout=60))


def test_served_tree_verification(feature_stack, tiny_target):
    prompt = PROMPTS[1]
    plain = plain_greedy(tiny_target, prompt, 6)
    n = len(prompt)
    # Pending plain[0]; nodes: 9 (wrong), plain[1], 9 under it (wrong), plain[2] under plain[1], 7 under plain[2].
    tree = target_pb2.TargetVerify(committed_len=n, token_ids=[plain[0], 9, plain[1], 9, plain[2], 7], parents=[-1, -1, 1, 1, 3])
    chain = target_pb2.TargetVerify(committed_len=n + 3, token_ids=[plain[3], plain[4]])
    responses = target_session(feature_stack, [target_pb2.TargetStart(prompt_token_ids=prompt, return_hidden_states=True), tree, chain])
    assert [r.accepted for r in responses] == [0, 2, 1]
    assert list(responses[1].token_ids) == plain[1:4] and responses[1].committed_len == n + 3
    assert list(responses[2].token_ids) == plain[4:6]
    served = torch.cat([hidden_states.from_proto(r.hidden_states) for r in responses])  # [n + 5, H]
    torch.testing.assert_close(served, teacher_forced_hidden(tiny_target, prompt + plain[:5]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parents", [[-1], [-1, 1], [0, -1], [-1, -3]], ids=["count", "self", "later", "below-root"])
def test_bad_parents_are_invalid_argument(feature_stack, parents):
    ops = [target_pb2.TargetStart(prompt_token_ids=[1, 2, 3]), target_pb2.TargetVerify(committed_len=3, token_ids=[4, 5, 6], parents=parents)]
    with pytest.raises(grpc.RpcError) as caught:
        target_session(feature_stack, ops)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("parents:"), caught.value.details()


def test_a_tree_in_a_sampled_session_is_invalid_argument(feature_stack):
    sampling = common_pb2.SamplingParams(temperature=0.8)
    ops = [target_pb2.TargetStart(prompt_token_ids=[1, 2, 3], sampling=sampling),
           target_pb2.TargetVerify(committed_len=3, token_ids=[4, 5, 6], parents=[-1, 0])]
    with pytest.raises(grpc.RpcError) as caught:
        target_session(feature_stack, ops)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("parents:"), caught.value.details()


def draft_session(stack, start: draft_pb2.DraftStart, propose: draft_pb2.DraftPropose):
    requests = [draft_pb2.DraftRequest(op_id=1, start=start), draft_pb2.DraftRequest(op_id=2, propose=propose)]
    with grpc.insecure_channel(stack.draft_address) as channel:
        return list(draft_pb2_grpc.DraftServiceStub(channel).Session(iter(requests), timeout=60))


def tree_propose(**shape) -> draft_pb2.DraftPropose:
    hidden = hidden_states.to_proto(torch.randn(3, 64))  # the tiny models' hidden size is 64
    return draft_pb2.DraftPropose(committed_len=1, token_ids=[2, 3, 4], hidden_states=hidden,
                                  tree=draft_pb2.TreeShape(**{"depth": 3, "width": 2, "branch": 3, "nodes": 8, **shape}))


def test_the_draft_service_drafts_trees(feature_stack):
    responses = draft_session(feature_stack, draft_pb2.DraftStart(prompt_token_ids=[1, 2, 3, 4]), tree_propose())
    tree = DraftTree(list(responses[1].token_ids), list(responses[1].parents))  # valid, or this raises
    assert len(tree) == 8 and tree.depth <= 3 and responses[1].forward_passes >= 3


@pytest.mark.parametrize("shape, field", [({"depth": 0}, "tree.depth"), ({"width": 0}, "tree.width"),
                                          ({"branch": 65}, "tree.branch"), ({"nodes": 0}, "tree.nodes")])
def test_bad_tree_shapes_are_invalid_argument(feature_stack, shape, field):
    with pytest.raises(grpc.RpcError) as caught:
        draft_session(feature_stack, draft_pb2.DraftStart(prompt_token_ids=[1, 2, 3, 4]), tree_propose(**shape))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:"), caught.value.details()


def test_a_tree_for_a_sampled_draft_session_is_invalid_argument(feature_stack):
    start = draft_pb2.DraftStart(prompt_token_ids=[1, 2, 3, 4], sampling=common_pb2.SamplingParams(temperature=0.8))
    with pytest.raises(grpc.RpcError) as caught:
        draft_session(feature_stack, start, tree_propose())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("tree:"), caught.value.details()
