"""The llama.cpp engine on the real default model's GGUF file: batched evaluation (a batch of
many tokens equals one token at a time, rollback and re-extension, hidden states, trees), and
greedy exactness of every method against the same engine's plain decoding, in process and
through the real gRPC services."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig
from specserve.loading import load_model, resolve_engine
from specserve.runtime.engine import Engine, EngineSession
from specserve.runtime.local import LocalDraftProposer
from specserve.runtime.models import SHIPPED_DRAFT, default_draft_model
from conftest import decode_locally, oracle_tree_decode, plain_greedy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (make install builds it)")

CONTEXT = list(range(1000, 1200))  # 200 tokens
REWRITE = (
    "Rewrite the following code so that every variable name is in upper case. Output only the code.\n\n"
    "def total_price(items, tax_rate):\n"
    "    subtotal = sum(item.price for item in items)\n"
    "    tax = subtotal * tax_rate\n"
    "    return subtotal + tax\n"
)
QUESTION = "What are three tips for staying productive when working from home?"


@pytest.fixture(scope="module")
def engine():
    loaded = load_model("smollm2", engine="llama.cpp", threads=2)
    yield loaded
    loaded.close()


def test_the_engine_states_its_facts(engine):
    assert isinstance(engine, Engine)
    assert engine.engine_name == "llama.cpp" and engine.dtype_name == "Q4_1"
    assert engine.vocab_size == 49152 and engine.hidden_size == 576
    assert 2 in engine.eos_token_ids
    assert isinstance(engine.new_session(), EngineSession)
    assert resolve_engine("auto", "smollm2") == "llama.cpp"
    assert resolve_engine("auto", str(SHIPPED_DRAFT)) == "torch"


def test_a_batch_equals_one_token_at_a_time(engine):
    new = [504, 3000, 77, 9, 281, 42, 1337, 5000, 12, 13, 14, 15, 16, 17, 18, 19]
    batched = engine.new_session()
    batched.extend(CONTEXT)
    rows = batched.extend(new, logits_for=len(new))  # [16, V]
    assert rows.shape == (16, engine.vocab_size) and rows.dtype == torch.float32
    single = engine.new_session()
    single.extend(CONTEXT)
    one_by_one = torch.stack([single.extend([t])[0] for t in new])  # [16, V]
    torch.testing.assert_close(rows, one_by_one, rtol=0, atol=0.05)
    assert rows.argmax(-1).tolist() == one_by_one.argmax(-1).tolist()
    # Roll back into the batch and extend again: the same logits as the first time.
    batched.rollback(len(CONTEXT) + 4)
    assert batched.length == len(CONTEXT) + 4
    again = batched.extend(new[4:], logits_for=len(new) - 4)
    torch.testing.assert_close(again, rows[4:], rtol=0, atol=0.05)
    with pytest.raises(ValueError):
        batched.rollback(batched.length + 1)
    batched.close()
    single.close()


def test_hidden_states_come_with_the_logits(engine):
    session = engine.new_session()
    logits, hidden = session.extend_with_hidden(CONTEXT[:20], logits_for=2)  # [2, V], [20, H]
    assert logits.shape == (2, engine.vocab_size) and hidden.shape == (20, engine.hidden_size)
    plain = engine.new_session()
    torch.testing.assert_close(logits, plain.extend(CONTEXT[:20], logits_for=2), rtol=0, atol=0.05)
    # The last hidden state is the one the logits come from: the next token's hidden state depends on it.
    step_logits, step_hidden = session.extend_with_hidden([5], logits_for=1)
    assert step_hidden.shape == (1, engine.hidden_size) and torch.isfinite(step_hidden).all()
    torch.testing.assert_close(step_logits, plain.extend([5]), rtol=0, atol=0.05)
    # The next session reuses the pooled context: without hidden states it must get the last row's logits.
    session.close()
    reused = engine.new_session()
    torch.testing.assert_close(reused.extend(CONTEXT[:20]), logits[-1:], rtol=0, atol=0.05)


def test_trees_decode_like_plain_greedy(engine):
    prompt = [1, 504, 3000, 77, 504, 3000, 9, 281]
    plain = plain_greedy(engine, prompt, 45)
    out, accepted = oracle_tree_decode(engine, prompt, 40, plain)
    assert out == plain[:40]
    assert accepted > 10


@pytest.mark.skipif(not (SHIPPED_DRAFT / "drafter.json").is_file(), reason="the shipped token draft is absent")
def test_a_token_draft_decodes_like_plain_greedy(engine):
    draft = load_model(str(SHIPPED_DRAFT))
    prompt = [1, 504, 3000, 77, 504, 3000, 9, 281]
    plain = plain_greedy(engine, prompt, 30)
    tokens, stats = decode_locally(engine, LocalDraftProposer(draft), prompt, k=4, max_new=30)
    assert tokens == plain[:len(tokens)] and len(tokens) == 30
    assert stats.accepted_tokens > 0


@pytest.fixture(scope="module")
def llama_stack(redis_url, tmp_path_factory):
    config = StackConfig(target_model="smollm2", draft_model=default_draft_model(), engine="llama.cpp", port=0,
                         redis=redis_url, threads=1, log_dir=tmp_path_factory.mktemp("llama-stack-logs"))
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        yield stub
        channel.close()


@pytest.mark.parametrize("content, max_new_tokens", [(QUESTION, 48), (REWRITE, 80)])
def test_every_method_through_the_services_equals_plain_decoding(llama_stack, content, max_new_tokens):
    def chat(method, **speculation):
        request = build_request(messages=[{"role": "user", "content": content}], method=method, max_new_tokens=max_new_tokens,
                                **speculation)
        return generate(llama_stack, request, timeout_s=600)

    plain = chat("autoregressive")
    assert len(plain.token_ids) > 10
    lookup = chat("prompt_lookup")
    assert lookup.token_ids == plain.token_ids
    if content is REWRITE:
        assert lookup.stats.target_forward_passes < lookup.stats.generated_tokens
    if default_draft_model() is not None:
        # The shipped feature draft reads the llama.cpp target's hidden states and drafts trees.
        # A fixed K: on this engine's cost curve the controller would mostly decode plainly.
        drafted = chat("draft_model", num_speculative_tokens=4, fixed_length=True)
        assert drafted.token_ids == plain.token_ids
        assert drafted.stats.accepted_tokens > 0
