"""The compiled engine on the real default model in float32: its logits and hidden states are
the torch engine's (within float32 tolerance), a chain equals single steps, trees keep the
right path, rollback and compaction, a batch equals each session alone, nothing recompiles
after the warm-up, int8 weights compute what they claim, and speculation through the gRPC
services (prompt lookup, the shipped feature draft's trees) decodes exactly what the same
engine decodes plainly."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from specserve.client import build_request, connect, generate
from specserve.core.tree import DraftTree, ancestor_mask
from specserve.launcher import Stack, StackConfig
from specserve.loading import load_model, resolve_engine
from specserve.runtime.compiled import CompiledEngine, load_compiled
from specserve.runtime.engine import Engine, EngineSession, Forward, run_forward
from specserve.runtime.models import default_draft_model
from specserve.runtime.static_decoder import Projection, project, quantize_int8
from conftest import oracle_tree_decode, plain_greedy

CONTEXT = list(range(1000, 1200))  # 200 tokens
NEW = [504, 3000, 77, 9, 281, 42, 1337, 5000, 12, 13, 14, 15, 16, 17, 18, 19]
PROMPT = [1, 504, 3000, 77, 504, 3000, 9, 281]
TEST_BUCKETS = (1, 4, 16)  # few buckets: compiling is the slow part
ATOL = 2e-4  # float32: different product shapes, not different maths


@pytest.fixture(scope="module")
def engine() -> CompiledEngine:
    torch.set_num_threads(1)
    return load_compiled("smollm2", "float32", buckets=TEST_BUCKETS)


@pytest.fixture(scope="module")
def reference():
    return load_model("smollm2", "float32", engine="torch")


def test_the_engine_states_its_facts(engine):
    assert isinstance(engine, Engine) and isinstance(engine.new_session(), EngineSession)
    assert engine.engine_name == "compiled" and engine.dtype_name == "float32" and engine.quantization == "none"
    assert engine.vocab_size == 49152 and engine.hidden_size == 576 and 2 in engine.eos_token_ids
    assert engine.returns_hidden_states and engine.supports_trees and engine.supports_batching
    assert engine.compile_s > 0
    assert resolve_engine("compiled", "smollm2") == "compiled"
    assert resolve_engine("auto", "sim:x") == "torch"  # auto never picks it


def test_logits_and_hidden_states_are_the_torch_engines(engine, reference):
    ours, theirs = engine.new_session(), reference.new_session()
    # 200 tokens: chunks of the largest bucket, the last one padded.
    torch.testing.assert_close(ours.extend(CONTEXT, logits_for=3), theirs.extend(CONTEXT, logits_for=3), rtol=0, atol=ATOL)
    logits, hidden = ours.extend_with_hidden(NEW[:5], logits_for=5)  # [5, V], [5, H]
    ref_logits, ref_hidden = theirs.extend_with_hidden(NEW[:5], logits_for=5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=ATOL)
    assert logits.dtype == torch.float32 and hidden.shape == (5, 576)
    ours.close()


def test_a_chain_equals_single_steps_and_rolls_back(engine):
    batched, single = engine.new_session(), engine.new_session()
    batched.extend(CONTEXT)
    single.extend(CONTEXT)
    rows = batched.extend(NEW, logits_for=len(NEW))  # [16, V]
    one_by_one = torch.stack([single.extend([t])[0] for t in NEW])  # [16, V]
    torch.testing.assert_close(rows, one_by_one, rtol=0, atol=ATOL)
    assert rows.argmax(-1).tolist() == one_by_one.argmax(-1).tolist()
    batched.rollback(len(CONTEXT) + 4)
    assert batched.length == len(CONTEXT) + 4
    torch.testing.assert_close(batched.extend(NEW[4:], logits_for=12), rows[4:], rtol=0, atol=ATOL)
    with pytest.raises(ValueError):
        batched.rollback(batched.length + 1)
    batched.close()
    with pytest.raises(ValueError):
        batched.extend([5])


def test_plain_greedy_is_the_torch_engines_and_trees_keep_the_right_path(engine, reference):
    plain = plain_greedy(engine, PROMPT, 45)
    assert plain == plain_greedy(reference, PROMPT, 45)
    out, accepted = oracle_tree_decode(engine, PROMPT, 40, plain)
    assert out == plain[:40]
    assert accepted > 10


def test_keep_compacts_a_tree_path_into_a_sequence(engine):
    tree = DraftTree([NEW[0], NEW[1], NEW[2], NEW[3]], [-1, -1, 1, 0])  # two branches: 0 -> 3 and 1 -> 2
    session = engine.new_session()
    session.extend(CONTEXT)
    positions = [len(CONTEXT) + d for d in [0, *tree.depths()]]
    session.extend_tree([NEW[4], *tree.tokens], positions, ancestor_mask(tree))
    session.keep(len(CONTEXT), [0, 2, 3])  # the root, node 1 and its child node 2
    assert session.length == len(CONTEXT) + 3
    after = session.extend([NEW[5]])
    chain = engine.new_session()
    chain.extend(CONTEXT)
    torch.testing.assert_close(after, chain.extend([NEW[4], NEW[1], NEW[2], NEW[5]]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("prefill", [5, 20])  # 3 + 4 + 5 rows share one pass; with 20, more than the largest bucket
def test_a_batch_equals_each_session_alone(engine, prefill):
    tree = DraftTree([NEW[0], NEW[1], NEW[2]], [-1, -1, 0])

    def forwards(sessions):
        a, b, c = sessions
        positions = [b.length + d for d in [0, *tree.depths()]]
        return [Forward(a, NEW[:3], logits_for=3, hidden=True),
                Forward(b, [NEW[5], *tree.tokens], logits_for=4, positions=positions, visible=ancestor_mask(tree)),
                Forward(c, CONTEXT[:prefill], logits_for=0)]

    def fresh():
        sessions = [engine.new_session() for _ in range(3)]
        sessions[0].extend(CONTEXT[:50])
        sessions[1].extend(CONTEXT[:7])
        return sessions

    batched = fresh()
    together = engine.forward_batch(forwards(batched))
    alone = [run_forward(f) for f in forwards(fresh())]
    for (logits, hidden), (ref_logits, ref_hidden) in zip(together, alone):
        assert (logits is None) == (ref_logits is None) and (hidden is None) == (ref_hidden is None)
        if logits is not None:
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
            assert logits.argmax(-1).tolist() == ref_logits.argmax(-1).tolist()
        if hidden is not None:
            torch.testing.assert_close(hidden, ref_hidden, rtol=0, atol=ATOL)
    # Each cache grew as alone: the next token's logits agree.
    assert [s.length for s in batched] == [53, 11, prefill]
    single = fresh()
    for f in forwards(single):
        run_forward(f)
    for ours, theirs in zip(batched, single):
        torch.testing.assert_close(ours.extend([NEW[9]]), theirs.extend([NEW[9]]), rtol=0, atol=ATOL)


def test_nothing_compiles_after_the_warm_up(engine):
    graphs = counters["stats"]["unique_graphs"]
    session = engine.new_session()
    others = [engine.new_session() for _ in range(2)]
    for n in (1, 3, 4, 9, 16, 70, 1, 2):  # every bucket, chunks, spans from 64 to 320
        session.extend(CONTEXT[:n], logits_for=1)
        engine.forward_batch([Forward(s, CONTEXT[:n], logits_for=1) for s in others])  # a batch's parts
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_eager_static_path_computes_the_same():
    eager = load_compiled("smollm2", "float32", compile=False)
    compiled_free = eager.new_session()
    reference = load_model("smollm2", "float32", engine="torch").new_session()
    torch.testing.assert_close(compiled_free.extend(CONTEXT[:40], logits_for=2), reference.extend(CONTEXT[:40], logits_for=2),
                               rtol=0, atol=ATOL)


def test_int8_weights_stay_close_to_the_model():
    weight = torch.randn(96, 64)
    q, scale = quantize_int8(weight, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-6
    # The int8 product is the product with the dequantized weights (bfloat16 activations).
    q, scale = quantize_int8(weight, torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    exact = x.float() @ (q.float() * scale.float()[:, None]).T  # [5, 96]
    torch.testing.assert_close(project(x, Projection(q, scale, None)).float(), exact, rtol=2e-2, atol=5e-2)
    # The whole model: its next-token choices over a text mostly agree with float32's.
    int8 = load_compiled("smollm2", "int8", compile=False)
    assert int8.dtype_name == "int8" and int8.quantization != "none"
    full = load_compiled("smollm2", "float32", compile=False)
    text = [1, 504, 3000, 77, 504, 3000, 9, 281, *CONTEXT[:32]]
    agree = (int8.new_session().extend(text, logits_for=40).argmax(-1) == full.new_session().extend(text, logits_for=40).argmax(-1))
    assert agree.float().mean() >= 0.8


QUESTION = "What are three tips for staying productive when working from home?"
REWRITE = (
    "Rewrite the following code so that every variable name is in upper case. Output only the code.\n\n"
    "def total_price(items, tax_rate):\n"
    "    subtotal = sum(item.price for item in items)\n"
    "    tax = subtotal * tax_rate\n"
    "    return subtotal + tax\n"
)


@pytest.fixture(scope="module")
def compiled_stack(tmp_path_factory):
    config = StackConfig(target_model="smollm2", draft_model=default_draft_model(), engine="compiled", dtype="float32", port=0,
                         redis="off", threads=1, log_dir=tmp_path_factory.mktemp("compiled-stack-logs"))
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        yield stub
        channel.close()


def test_speculation_through_the_services_equals_plain_decoding(compiled_stack):
    for content, max_new_tokens in ((QUESTION, 32), (REWRITE, 64)):
        def chat(method, **speculation):
            request = build_request(messages=[{"role": "user", "content": content}], method=method,
                                    max_new_tokens=max_new_tokens, **speculation)
            return generate(compiled_stack, request, timeout_s=600)

        plain = chat("autoregressive")
        assert len(plain.token_ids) > 10
        lookup = chat("prompt_lookup")
        assert lookup.token_ids == plain.token_ids
        if content is REWRITE:
            assert lookup.stats.target_forward_passes < lookup.stats.generated_tokens
        if default_draft_model() is not None:
            # The shipped feature draft reads the compiled target's hidden states and drafts trees.
            # A fixed K: where verify rows cost more than a little the controller decodes plainly.
            drafted = chat("draft_model", num_speculative_tokens=4, fixed_length=True)
            assert drafted.token_ids == plain.token_ids
            assert drafted.stats.accepted_tokens > 0
