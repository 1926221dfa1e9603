"""Medusa: trees from medusa_choices, typical acceptance, the published checkpoint layout,
heads co-located with the target (in process and served), exact greedy output."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch
from safetensors.torch import save_file

from specserve.core.adaptive import SpeculationLength
from specserve.core.errors import InvalidArgument
from specserve.core.medusa_proposer import ColocatedMedusaProposer
from specserve.core.medusa_tree import (DEFAULT_MEDUSA_CHOICES, accept_typical_tree, build_medusa_tree, default_choices,
                                        typical_threshold)
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, decode
from specserve.core.tree import DraftTree, ancestor_mask
from specserve.drafter.medusa import MedusaHeads, is_medusa_checkpoint, load_medusa, save_medusa
from specserve.launcher import Stack, StackConfig
from specserve.runtime.medusa_step import LocalMedusaTargetSession, MedusaOptions
from specserve.runtime.models import load_model
from conftest import build_tiny_model, plain_greedy

NUM_HEADS = 4
CHOICES = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]


# --- trees from medusa_choices ----------------------------------------------------------

def test_tree_from_choices_orders_nodes_and_fills_tokens():
    tree = build_medusa_tree([[0, 1], [1], [0], [0, 0], [0, 0, 2]], num_heads=3)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (0, 0, 2))
    assert tree.parents == (-1, -1, 0, 0, 2)
    assert tree.heads == (0, 0, 1, 1, 2) and tree.ranks == (0, 1, 0, 1, 2)
    assert [tree.top_k(h) for h in range(4)] == [2, 2, 3, 0]
    top = [[10, 11], [20, 21], [30, 31, 32]]
    filled = tree.fill(top)
    assert filled.tokens == [10, 11, 20, 21, 32] and filled.parents == [-1, -1, 0, 0, 2]
    assert torch.equal(tree.mask, ancestor_mask(filled))
    assert tree.depth == 3 and tree.pruned(2).choices == ((0,), (1,), (0, 0), (0, 1))


def test_default_tree_is_valid_for_four_heads():
    tree = build_medusa_tree(DEFAULT_MEDUSA_CHOICES, NUM_HEADS)
    assert tree.depth == 4 and len(tree.parents) == len(DEFAULT_MEDUSA_CHOICES)
    assert all(len(c) <= 2 for c in default_choices(2))


@pytest.mark.parametrize("choices, message", [
    ([], "at least one path"),
    ([[0], []], "medusa_choices[1]: a path must name at least one rank"),
    ([[0], [0, 0, 0, 0, 0]], "longer than the 4 heads"),
    ([[0], [0, 40]], "ranks must be in [0, 32)"),
    ([[0], [0]], "distinct"),
    ([[0], [1, 0]], "needs its prefix [1]"),
    ([[i] for i in range(20)] + [[0, i] for i in range(20)] + [[1, i] for i in range(20)] + [[2, i] for i in range(5)], "at most 64"),
])
def test_bad_choices_name_the_field(choices, message):
    with pytest.raises(InvalidArgument) as error:
        build_medusa_tree(choices, NUM_HEADS)
    assert message in str(error.value) and "medusa_choices" in str(error.value)


# --- typical acceptance -------------------------------------------------------------------

def test_typical_threshold_follows_entropy():
    flat = torch.full((1, 100), 0.01)  # high entropy: exp(-H) = 0.01
    peaked = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    assert typical_threshold(flat, 0.09, 0.3).item() == pytest.approx(0.003)
    entropy = -(peaked * peaked.log()).sum()
    assert typical_threshold(peaked, 0.09, 0.3).item() == pytest.approx(min(0.09, 0.3 * float(torch.exp(-entropy))))


def test_typical_acceptance_takes_the_longest_accepted_path():
    # root -> a(0) -> c(2); root -> b(1) -> d(3) -> e(4); vocabulary of 6.
    tree = DraftTree([0, 1, 2, 3, 4], [-1, -1, 0, 1, 3])
    probs = torch.full((6, 6), 0.02)
    probs[0, 0], probs[0, 1] = 0.5, 0.4  # after the root both a and b are typical
    probs[1, 2] = 0.9  # after a: c
    probs[2, 3] = 0.9  # after b: d
    probs[4, 4] = 0.9  # after d: e
    probs = probs / probs.sum(-1, keepdim=True)
    assert accept_typical_tree(probs, tree) == [1, 3, 4]
    probs[4] = 1 / 6  # after d nothing is likely enough... a uniform row: threshold min(0.09, 0.3/6) = 0.05 < 1/6
    assert accept_typical_tree(probs, tree) == [1, 3, 4]
    probs[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # nothing typical after the root
    assert accept_typical_tree(probs, tree) == []


# --- the checkpoint layout ----------------------------------------------------------------

def write_published_checkpoint(directory, heads: MedusaHeads, base_model: str, weights: str = "safetensors") -> None:
    """A checkpoint as the public Medusa code writes it: the heads' ModuleList state dict
    (`{head}.{layer}.linear.weight|bias`, `{head}.{num_layers}.weight`) and a config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in heads.heads.state_dict().items()}
    assert f"0.{heads.num_layers}.weight" in state and "0.0.linear.bias" in state
    if weights == "safetensors":
        save_file(state, str(directory / "medusa_lm_head.safetensors"))
    else:
        torch.save({f"medusa_head.{k}": v for k, v in state.items()}, directory / "medusa_lm_head.pt")
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "base_model_name_or_path": base_model, "architectures": ["MedusaModel"]}
    (directory / "config.json").write_text(json.dumps(config))


def test_checkpoint_round_trips(tmp_path, medusa_target):
    heads = random_heads(medusa_target, seed=5, num_layers=2)
    for weights in ("safetensors", "pt"):
        write_published_checkpoint(tmp_path / weights, heads, "tiny", weights)
        assert is_medusa_checkpoint(tmp_path / weights)
        loaded, config = load_medusa(tmp_path / weights)
        assert loaded.num_heads == NUM_HEADS and loaded.num_layers == 2 and config["base_model_name_or_path"] == "tiny"
        hidden = torch.randn(3, heads.hidden_size)
        assert torch.allclose(loaded(hidden), heads(hidden))
    restricted = MedusaHeads(heads.hidden_size, 100, 2, 1, vocab_ids=torch.arange(0, 200, 2))
    save_medusa(restricted, tmp_path / "ours", base_model="tiny", dtype=torch.float32)
    loaded, config = load_medusa(tmp_path / "ours")
    assert torch.equal(loaded.vocab_ids, restricted.vocab_ids) and config["medusa_num_heads"] == 2


# --- co-located heads, in process -----------------------------------------------------------

@pytest.fixture(scope="module")
def medusa_target_dir(tmp_path_factory):
    """A tiny target whose attention and MLP outputs are scaled down, so its next token leans on
    the current one: its greedy text partly repeats and heads read from its LM head often
    guess right (both acceptance and rejection happen)."""
    directory = build_tiny_model(tmp_path_factory.mktemp("medusa-target"), seed=0, layers=2)
    model = load_model(str(directory)).model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def medusa_target(medusa_target_dir):
    return load_model(str(medusa_target_dir), "float32")


def random_heads(target, seed: int, num_layers: int = 1) -> MedusaHeads:
    """Heads as training starts them (output = the target's LM head), their blocks nudged at random."""
    torch.manual_seed(seed)
    heads = MedusaHeads(target.model.config.hidden_size, target.vocab_size, NUM_HEADS, num_layers)
    heads.init_from_lm_head(target.model.lm_head.weight.detach())
    with torch.no_grad():
        for head in heads.heads:
            for block in head[:-1]:
                block.linear.weight.normal_(0, 0.02)
    return heads.eval()


def decode_medusa(target, heads, prompt, options, temperature=0.0, seed=0, max_new=40):
    sampling = SamplingConfig(temperature=temperature, top_k=20 if temperature else 0, max_new_tokens=max_new)
    chain = temperature and not options.typical
    k = NUM_HEADS if chain else options.tree.depth
    request = DecodeRequest(prompt, sampling, seed, frozenset(), target.max_context_tokens, SpeculationLength(k, k_max=16, fixed=True))

    async def collect():
        session = LocalMedusaTargetSession(target, heads)
        return [t async for chunk in decode(session, ColocatedMedusaProposer(options), request) for t in chunk.tokens]

    return asyncio.run(collect()), request.stats


PROMPTS = [[1, 504, 3000, 77, 504, 3000], list(range(100, 160)), [7, 7, 7]]


@pytest.mark.parametrize("choices", [CHOICES, list(DEFAULT_MEDUSA_CHOICES), [[0]], [[1], [1, 2]]])
def test_greedy_medusa_equals_plain_decoding(medusa_target, choices):
    heads = random_heads(medusa_target, seed=1)
    options = MedusaOptions(build_medusa_tree(choices, NUM_HEADS))
    accepted = 0
    for prompt in PROMPTS:
        out, stats = decode_medusa(medusa_target, heads, prompt, options)
        assert out == plain_greedy(medusa_target, prompt, 40)
        assert stats.proposed_tokens >= len(choices)
        accepted += stats.accepted_tokens
    if len(choices) > 2:
        assert accepted > 0  # the acceptance path (KV compaction, heads on a deeper state) ran


def test_sampled_chain_is_drawn_from_the_distributions_it_reports(medusa_target):
    """Rejection sampling is lossless only if each candidate was drawn from the distribution the
    target then uses as the draft's: over many seeds, head 0's candidates follow its row."""
    from specserve.runtime.medusa_step import MedusaTargetWorker

    heads = random_heads(medusa_target, seed=2)
    options = MedusaOptions(build_medusa_tree(CHOICES, NUM_HEADS))
    sampling = SamplingConfig(temperature=1.5, top_k=4)
    counts, reference = torch.zeros(medusa_target.vocab_size), None
    trials = 400
    for seed in range(trials):
        worker = MedusaTargetWorker(medusa_target, heads)
        worker.start(PROMPTS[0], sampling, seed, medusa=options)
        assert worker.last_candidates.parents is None and len(worker.last_candidates.tokens) == NUM_HEADS
        q = worker._candidate_probs[0]  # [V]
        reference = q if reference is None else reference
        assert torch.allclose(q, reference)  # the same state every time: the prompt's
        counts[worker.last_candidates.tokens[0]] += 1
    assert int((reference > 0).sum()) == 4 and abs(float(reference.sum()) - 1) < 1e-5
    total_variation = 0.5 * float((counts / trials - reference).abs().sum())
    assert total_variation < 0.08


def test_sampled_medusa_is_reproducible_and_typical_accepts_more(medusa_target):
    heads = random_heads(medusa_target, seed=3)
    lossless = MedusaOptions(build_medusa_tree(CHOICES, NUM_HEADS))
    typical = MedusaOptions(build_medusa_tree(CHOICES, NUM_HEADS), typical=True)
    a, stats_a = decode_medusa(medusa_target, heads, PROMPTS[0], lossless, temperature=0.8, seed=4)
    b, _ = decode_medusa(medusa_target, heads, PROMPTS[0], lossless, temperature=0.8, seed=4)
    assert a == b and len(a) == 40 and stats_a.proposed_tokens > 0
    accepted = {"rejection": 0, "typical": 0}
    for seed in range(4):
        for name, options in (("rejection", lossless), ("typical", typical)):
            out, stats = decode_medusa(medusa_target, heads, PROMPTS[1], options, temperature=0.8, seed=seed)
            assert len(out) == 40
            accepted[name] += stats.accepted_tokens
    assert accepted["typical"] > accepted["rejection"]


# --- served: a published checkpoint beside the target ----------------------------------------

@pytest.fixture(scope="module")
def medusa_stack(medusa_target_dir, medusa_target, tmp_path_factory):
    heads_dir = tmp_path_factory.mktemp("published-medusa")
    write_published_checkpoint(heads_dir, random_heads(medusa_target, seed=1), str(medusa_target_dir))
    config = StackConfig(target_model=str(medusa_target_dir), draft_model=None, dtype="float32", port=0, redis="off",
                         default_method="medusa", threads=1, target_medusa=str(heads_dir),
                         log_dir=tmp_path_factory.mktemp("medusa-stack-logs"))
    with Stack(config) as stack:
        yield stack


@pytest.fixture(scope="module")
def stub(medusa_stack):
    from specserve.client import connect

    channel, stub = connect(medusa_stack.address)
    yield stub
    channel.close()


def served(stub, **kwargs):
    from specserve.client import build_request, generate

    kwargs.setdefault("max_new_tokens", 40)
    request = build_request(**kwargs)
    request.include_step_timings = True
    return generate(stub, request, timeout_s=120)


TEXTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "Once upon a time"]


@pytest.mark.parametrize("text", TEXTS)
def test_served_medusa_equals_autoregressive(stub, text):
    from specserve.v1 import orchestrator_pb2 as pb

    plain = served(stub, prompt=text, method="autoregressive")
    assert len(plain.token_ids) == 40
    for choices in (None, CHOICES, [[0], [0, 0]]):
        result = served(stub, prompt=text, method="medusa", medusa_choices=choices)
        assert result.token_ids == plain.token_ids, choices
        stats = result.stats
        assert stats.method == pb.MEDUSA and not stats.lossy and stats.draft_forward_passes == 0
        assert stats.proposed_tokens > 0 and stats.target_forward_passes < 42
        nodes = len(choices or DEFAULT_MEDUSA_CHOICES)
        assert max(s.proposed for s in stats.step_timings) == nodes


def test_served_sampling_and_typical_acceptance(stub):
    kwargs = dict(prompt=TEXTS[1], method="medusa", temperature=0.8, top_k=20, seed=9)
    a, b = served(stub, **kwargs), served(stub, **kwargs)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 40 and not a.stats.lossy
    assert all(s.proposed <= NUM_HEADS for s in a.stats.step_timings)  # chains of the heads' samples
    typical = served(stub, typical_acceptance=True, **kwargs)
    assert typical.stats.lossy and len(typical.token_ids) == 40
    greedy_typical = served(stub, prompt=TEXTS[1], method="medusa", typical_acceptance=True)
    assert not greedy_typical.stats.lossy  # greedy requests ignore it: still the target's own output


@pytest.mark.parametrize("kwargs, field", [
    (dict(medusa_choices=[[0], [1, 0]]), "speculation.medusa.choices[1]"),
    (dict(medusa_choices=[[0, 0, 0, 0, 0]]), "speculation.medusa.choices[0]"),
    (dict(typical_acceptance=True, posterior_alpha=0.0), "speculation.medusa.posterior_alpha"),
    (dict(typical_acceptance=True, posterior_threshold=2.0), "speculation.medusa.posterior_threshold"),
])
def test_served_bad_medusa_params_name_the_field(stub, kwargs, field):
    with pytest.raises(grpc.RpcError) as error:
        served(stub, prompt=TEXTS[1], method="medusa", temperature=0.5, **kwargs)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()


def test_target_without_heads_refuses_medusa(tiny_stack):
    from specserve.client import connect

    channel, stub_ = connect(tiny_stack.address)
    try:
        with pytest.raises(grpc.RpcError) as error:
            served(stub_, prompt=TEXTS[1], method="medusa")
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Medusa heads" in error.value.details()
    finally:
        channel.close()
