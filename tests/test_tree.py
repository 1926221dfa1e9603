"""Token trees: the core (masks, greedy walks, validation), the workers (tree attention and KV
compaction decode exactly like plain greedy), the decoding loop, and trees end to end through
the feature draft stack (fp32, greedy: token for token; sampled requests use chains)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from specserve.core.acceptance import Verdict
from specserve.core.adaptive import SpeculationLength
from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, Proposal, decode
from specserve.core.proposers import WithLookupBranch
from specserve.core.tree import MAX_TREE_NODES, DraftTree, TreeShape, accept_greedy_tree, ancestor_mask, merge_chain, split_tree
from specserve.runtime.local import LocalFeatureDraftProposer, local_draft_proposer
from specserve.runtime.workers import FeatureDraftWorker, TargetWorker
from specserve.v1 import draft_pb2
from conftest import VOCAB, decode_locally, plain_greedy, teacher_forced_hidden

PROMPTS = [[1, 504, 3000, 77, 504, 3000], list(range(100, 160))]
TEXT_PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "Once upon a time"]
SHAPE = TreeShape(width=3, branch=3, nodes=10)


# Core ------------------------------------------------------------------------------------


def one_hot_logits(choices: list[int], vocab: int = 12) -> torch.Tensor:
    logits = torch.zeros(len(choices), vocab)  # [n+1, V]
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 5.0
    return logits


def test_ancestor_mask_of_a_small_tree():
    #        root
    #       /    \
    #     0:3    1:4
    #    /   \      \
    #  2:5   3:6    4:7
    #   |
    #  5:8
    tree = DraftTree([3, 4, 5, 6, 7, 8], [-1, -1, 0, 0, 1, 2])
    assert tree.depths() == [1, 1, 2, 2, 2, 3] and tree.depth == 3
    assert tree.path_to(5) == [0, 2, 5] and tree.path_to(4) == [1, 4]
    expected = torch.tensor([
        # root 0  1  2  3  4  5
        [1, 0, 0, 0, 0, 0, 0],  # root
        [1, 1, 0, 0, 0, 0, 0],  # 0
        [1, 0, 1, 0, 0, 0, 0],  # 1
        [1, 1, 0, 1, 0, 0, 0],  # 2
        [1, 1, 0, 0, 1, 0, 0],  # 3
        [1, 0, 1, 0, 0, 1, 0],  # 4
        [1, 1, 0, 1, 0, 0, 1],  # 5
    ], dtype=torch.bool)
    assert torch.equal(ancestor_mask(tree), expected)


def test_a_chain_is_a_tree_with_a_causal_mask():
    chain = DraftTree.chain([5, 6, 7])
    assert chain.parents == [-1, 0, 1] and chain.depth == 3
    assert torch.equal(ancestor_mask(chain), torch.ones(4, 4, dtype=torch.bool).tril())
    assert DraftTree.chain([]).depth == 0


TREE = DraftTree([3, 4, 5, 6, 7, 8], [-1, -1, 0, 0, 1, 2])


@pytest.mark.parametrize(
    "choices, path, tokens",
    [
        # rows: 0 after the root, i+1 after node i
        ([3, 5, 0, 8, 0, 0, 9], [0, 2, 5], [3, 5, 8, 9]),  # the deepest path, then a bonus token
        ([3, 6, 0, 0, 11, 0, 0], [0, 3], [3, 6, 11]),  # a second child, then the target's token after it
        ([4, 0, 7, 0, 0, 10, 0], [1, 4], [4, 7, 10]),  # the root's second child
        ([3, 9, 0, 0, 0, 0, 0], [0], [3, 9]),  # no child of node 0 agrees: recovered token 9
        ([11, 5, 7, 8, 0, 0, 0], [], [11]),  # no child of the root agrees: plain decoding's token
    ],
)
def test_greedy_tree_acceptance_walks_down_the_agreeing_path(choices, path, tokens):
    verdict, accepted_path = accept_greedy_tree(one_hot_logits(choices), TREE)
    assert accepted_path == path
    assert verdict == Verdict(len(path), tokens)


def test_a_duplicate_sibling_never_wins():
    # Node 1 repeats node 0's token; only node 0 (the first) can be accepted, so node 1's child is out of reach.
    tree = DraftTree([3, 3, 5], [-1, -1, 1])
    verdict, path = accept_greedy_tree(one_hot_logits([3, 5, 5, 0]), tree)
    assert path == [0] and verdict == Verdict(1, [3, 5])


def test_an_empty_tree_is_plain_decoding():
    verdict, path = accept_greedy_tree(one_hot_logits([7]), DraftTree([], []))
    assert path == [] and verdict == Verdict(0, [7])


@pytest.mark.parametrize("tokens, parents", [([1, 2], [-1]), ([1], [0]), ([1, 2], [-1, 1]), ([1, 2], [-1, 2]), ([1], [-2])])
def test_malformed_trees_are_refused(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)


@pytest.mark.parametrize(
    "token_ids, parents, field",
    [
        ([], [], "token_ids"),
        ([9, 1, 2], [-1], "parents"),  # a parent per node
        ([9, 1, 2], [-1, 1], "parents"),  # its own parent
        ([9, 1, 2], [1, -1], "parents"),  # a later parent
        ([9] + [1] * (MAX_TREE_NODES + 1), [-1] * (MAX_TREE_NODES + 1), "parents"),  # too many nodes
    ],
)
def test_split_tree_names_the_field_at_fault(token_ids, parents, field):
    with pytest.raises(InvalidArgument) as caught:
        split_tree(token_ids, parents)
    assert str(caught.value).startswith(f"{field}:"), str(caught.value)


def test_split_tree():
    pending, tree = split_tree([9, 1, 2, 3], [-1, -1, 0])
    assert pending == 9 and tree == DraftTree([1, 2, 3], [-1, -1, 0])


@pytest.mark.parametrize("shape, field", [
    (TreeShape(depth=0), "tree.depth"), (TreeShape(width=0), "tree.width"), (TreeShape(branch=MAX_TREE_NODES + 1), "tree.branch"),
    (TreeShape(nodes=0), "tree.nodes"), (TreeShape(nodes=MAX_TREE_NODES + 1), "tree.nodes"),
])
def test_tree_shape_checks_name_the_field(shape, field):
    TreeShape().check()
    with pytest.raises(InvalidArgument) as caught:
        shape.check("tree")
    assert str(caught.value).startswith(f"{field}:")


def test_a_proposal_knows_its_depth():
    assert Proposal([5, 6, 7]).depth == 3
    assert Proposal([5, 6, 7], parents=[-1, -1, 1]).depth == 2
    assert Proposal([]).depth == 0


# The decoding loop with trees, on scripted sessions ------------------------------------


def truth(token: int) -> int:
    """The scripted target's greedy next token."""
    return (token * 7 + 3) % 1000


class ScriptedTarget:
    """Greedy decoding of `truth`; trees are walked as accept_greedy_tree does."""

    def __init__(self):
        self.last_compute_ms = 0.0
        self.last_hidden_states = None
        self.parents_seen: list[list[int] | None] = []

    async def start(self, prompt, sampling, seed, return_hidden_states=False):
        return truth(prompt[-1])

    async def verify(self, committed_len, tokens, draft_probs, parents=None):
        self.parents_seen.append(parents)
        pending, tree = split_tree(tokens, parents) if parents else (tokens[0], DraftTree.chain(tokens[1:]))
        out, node, last = [], -1, pending
        while True:
            nxt = next((i for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)) if p == node and t == truth(last)), None)
            if nxt is None:
                return Verdict(len(out), out + [truth(last)])
            out.append(tree.tokens[nxt])
            node, last = nxt, tree.tokens[nxt]


class ScriptedTreeProposer:
    """Trees of depth k: the true path, with a wrong sibling at every level (2k nodes)."""

    def __init__(self):
        self.forward_passes = 0
        self.last_compute_ms = 0.0
        self.ks: list[int] = []

    async def start(self, prompt, sampling, seed):
        return None

    async def propose(self, sequence, k):
        self.ks.append(k)
        tokens, parents, last, parent = [], [], sequence[-1], -1
        for _ in range(k):
            tokens += [truth(last) + 1000, truth(last)]  # a wrong sibling first, then the truth
            parents += [parent, parent]
            parent, last = len(tokens) - 1, truth(last)
        return Proposal(tokens, None, parents)


def test_the_loop_sends_trees_and_adapts_k_to_their_depth():
    target, proposer = ScriptedTarget(), ScriptedTreeProposer()
    request = DecodeRequest([5], SamplingConfig(max_new_tokens=40), 0, frozenset(), 10_000, SpeculationLength(2, k_max=8))

    async def collect():
        return [t async for chunk in decode(target, proposer, request) for t in chunk.tokens]

    tokens = asyncio.run(collect())
    expected = [truth(5)]
    while len(expected) < 40:
        expected.append(truth(expected[-1]))
    assert tokens == expected
    assert proposer.ks[:4] == [2, 4, 6, 8]  # every path fully accepted: K grows by 2 per step, as for chains
    assert all(parents for parents in target.parents_seen)
    stats = request.stats
    assert stats.proposed_tokens == 2 * sum(proposer.ks)  # every node counts
    assert stats.accepted_tokens == sum(proposer.ks)


def test_merge_chain_reuses_the_shared_prefix_and_appends_the_rest():
    tree = DraftTree([10, 20, 11, 12], [-1, -1, 0, 2])  # 10 -> 11 -> 12, and 20
    merged = merge_chain(tree, [10, 11, 13, 14])
    assert merged.tokens == [10, 20, 11, 12, 13, 14]
    assert merged.parents == [-1, -1, 0, 2, 2, 4]  # 13 hangs off 11; 14 off 13
    assert merge_chain(tree, [10, 11, 12]) == tree  # already there
    assert merge_chain(tree, []) == tree
    assert merge_chain(DraftTree([], []), [7, 8]) == DraftTree.chain([7, 8])


def test_the_lookup_branch_joins_trees_and_leaves_chains_alone():
    sequence = [1, 2, 3, 4, 5, 9, 2, 3]  # "2 3" was followed by "4 5 9"

    class Fixed:
        forward_passes = 0
        last_compute_ms = 0.0

        def __init__(self, proposal):
            self.proposal = proposal

        async def start(self, prompt, sampling, seed):
            return None

        async def propose(self, sequence, k):
            return self.proposal

    tree = Proposal([4, 7], None, [-1, -1])
    merged = asyncio.run(WithLookupBranch(Fixed(tree)).propose(sequence, 3))
    assert (merged.tokens, merged.parents) == ([4, 7, 5, 9], [-1, -1, 0, 2])
    chain = Proposal([4, 7])
    assert asyncio.run(WithLookupBranch(Fixed(chain)).propose(sequence, 3)) is chain
    assert WithLookupBranch(Fixed(chain)).forward_passes == 0  # attributes reach the wrapped proposer


# Workers with the tiny models (fp32) -----------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_oracle_trees_decode_like_plain_greedy(tiny_target, prompt):
    """Trees holding the true continuation among random siblings and children: tree attention
    and the KV compaction of the accepted path leave exactly plain decoding's state."""
    n = 50
    plain = plain_greedy(tiny_target, prompt, n + 5)
    rng = random.Random(0)
    worker = TargetWorker(tiny_target)
    out = [worker.start(prompt, SamplingConfig(), 0, return_hidden_states=True)]
    rows = [worker.last_hidden_states]
    accepted = 0
    while len(out) < n:
        tokens, parents, parent = [], [], -1
        for true_token in plain[len(out):len(out) + rng.randint(0, 4)]:
            for _ in range(rng.randint(0, 2)):  # distractor siblings before the truth
                tokens.append(rng.randrange(VOCAB))
                parents.append(parent)
            tokens.append(true_token)
            parents.append(parent)
            parent = len(tokens) - 1
            tokens.append(rng.randrange(VOCAB))  # a distractor child
            parents.append(parent)
        sequence = prompt + out
        verdict = worker.verify_tree(len(sequence) - 1, sequence[-1], DraftTree(tokens, parents))
        assert worker.kv.length == len(sequence) + verdict.accepted
        accepted += verdict.accepted
        out += verdict.tokens
        rows.append(worker.last_hidden_states)
        assert rows[-1].shape[0] == 1 + verdict.accepted
    assert out[:n] == plain[:n]
    assert accepted > 20
    sequence = prompt + out
    torch.testing.assert_close(torch.cat(rows), teacher_forced_hidden(tiny_target, sequence[:-1]), rtol=1e-4, atol=1e-4)


def counting_trees(proposer: LocalFeatureDraftProposer) -> list[int]:
    """Records the node count of every tree the proposer's worker drafts."""
    sizes: list[int] = []
    propose_tree = proposer.worker.propose_tree

    def recording(*args):
        tree = propose_tree(*args)
        sizes.append(len(tree))
        return tree

    proposer.worker.propose_tree = recording
    return sizes


@pytest.mark.parametrize("prompt", PROMPTS)
def test_feature_draft_trees_decode_like_plain_greedy(tiny_target, feature_draft, prompt):
    plain, _ = decode_locally(tiny_target, None, prompt)
    for k, fixed, shape in ((1, True, SHAPE), (4, True, SHAPE), (4, False, TreeShape()), (3, True, TreeShape(width=1, branch=1, nodes=3))):
        proposer = local_draft_proposer(feature_draft, shape)
        sizes = counting_trees(proposer)
        tokens, stats = decode_locally(tiny_target, proposer, prompt, k=k, fixed=fixed)
        assert tokens == plain, (k, fixed, shape)
        assert sizes and stats.proposed_tokens == sum(sizes)
        assert max(sizes) <= shape.nodes


def test_an_agreeing_feature_draft_s_trees_are_accepted(agreeing_pair):
    target, draft = agreeing_pair
    for prompt in PROMPTS:
        plain, _ = decode_locally(target, None, prompt, max_new=40)
        # Width 1: the draft's greedy path with 2 siblings per node; the target agrees with that path.
        tokens, stats = decode_locally(target, local_draft_proposer(draft, TreeShape(width=1, branch=3, nodes=12)), prompt, k=4, max_new=40)
        assert tokens == plain
        assert stats.accepted_tokens == 4 * stats.decode_steps - 1  # a whole path of 4 every step (the last one cut to the budget)
        # Wider trees keep the likeliest paths under the draft, and this draft is far from confident,
        # so its greedy path can drop out of a level's 3 best; still 2 tokens or more accepted per step.
        tokens, stats = decode_locally(target, local_draft_proposer(draft, SHAPE), prompt, k=4, max_new=40)
        assert tokens == plain
        assert stats.accepted_tokens >= 2 * stats.decode_steps, stats


def test_trees_near_the_end_of_the_context_window(tiny_target, feature_draft):
    """The window bounds positions (committed + depth), not the nodes a verify scores at once."""
    prompt = list(range(1000, 1000 + tiny_target.max_context_tokens - 8))
    plain, _ = decode_locally(tiny_target, None, prompt, max_new=20)
    assert len(plain) == 8
    proposer = local_draft_proposer(feature_draft, TreeShape(nodes=16))
    sizes = counting_trees(proposer)
    tokens, _ = decode_locally(tiny_target, proposer, prompt, k=4, max_new=20)
    assert tokens == plain and max(sizes) > 8


def test_sampled_requests_get_chains(tiny_target, feature_draft):
    proposer = local_draft_proposer(feature_draft, SHAPE)
    sizes = counting_trees(proposer)
    a, stats = decode_locally(tiny_target, proposer, PROMPTS[0], k=4, temperature=0.9, seed=5)
    b, _ = decode_locally(tiny_target, local_draft_proposer(feature_draft, SHAPE), PROMPTS[0], k=4, temperature=0.9, seed=5)
    assert sizes == [] and stats.proposed_tokens > 0
    assert a == b


def test_workers_refuse_trees_when_sampling(tiny_target, feature_draft):
    sampled = SamplingConfig(temperature=0.8)
    target = TargetWorker(tiny_target)
    target.start(PROMPTS[0], sampled, 0)
    with pytest.raises(InvalidArgument, match="^parents:"):
        target.verify_tree(len(PROMPTS[0]), 5, DraftTree([1, 2], [-1, -1]))
    draft = FeatureDraftWorker(feature_draft)
    draft.start(PROMPTS[0], sampled, 0)
    with pytest.raises(InvalidArgument, match="^tree:"):
        draft.propose_tree(1, PROMPTS[0][1:], torch.zeros(len(PROMPTS[0]) - 1, 64), TreeShape())


def test_a_token_draft_service_refuses_trees(tiny_draft_dir):
    from draft_service.servicer import DraftServicer
    from specserve.loading import load_model
    from specserve.serving.model_host import ModelHost

    host = ModelHost(load_model(str(tiny_draft_dir)), max_sessions=1)
    servicer = DraftServicer(host)
    worker = servicer.new_worker()
    start = draft_pb2.DraftRequest(op_id=1, start=draft_pb2.DraftStart(prompt_token_ids=[1, 2, 3]))
    propose = draft_pb2.DraftRequest(op_id=2, propose=draft_pb2.DraftPropose(
        committed_len=3, token_ids=[4], num_tokens=2, tree=draft_pb2.TreeShape(depth=2, width=2, branch=2, nodes=4)))

    async def exchange():
        await servicer._handle(worker, start)
        return await servicer._handle(worker, propose)

    with pytest.raises(FailedPrecondition, match="^tree: the hosted draft is a token draft"):
        asyncio.run(exchange())


def test_tree_settings_reach_the_stack_and_the_orchestrator(monkeypatch):
    import argparse

    from orchestrator.main import add_arguments
    from specserve.generation.requests import Limits
    from specserve.cli import _stack_config, build_parser

    assert _stack_config(build_parser().parse_args(["up"])).tree_nodes == TreeShape().nodes
    config = _stack_config(build_parser().parse_args(["up", "--tree-nodes", "0", "--tree-width", "2", "--tree-branch", "3"]))
    assert (config.tree_nodes, config.tree_width, config.tree_branch) == (0, 2, 3)
    monkeypatch.setenv("SPECSERVE_TREE_NODES", "7")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.tree_nodes, args.tree_width, args.tree_branch) == (7, TreeShape().width, TreeShape().branch)
    assert Limits().tree_shape(Limits().tree_nodes) == TreeShape(depth=TreeShape().depth)
    assert Limits().tree_shape(0) is None
    with pytest.raises(ValueError, match="tree_nodes"):
        Limits(tree_nodes=MAX_TREE_NODES + 1)
    with pytest.raises(ValueError, match="tree_width"):
        Limits(tree_width=0)
