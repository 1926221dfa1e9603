"""The llama.cpp engine's batched forward on the real default model's GGUF file: one
forward_batch mixing a prefill, single-token decodes (one with hidden states), a multi-token
chain and a tree gives what each session gets alone through run_forward (the baseline: an
engine with a private context per session), and the sessions' caches go on identically
(more decode steps, keep, rollback, close and reuse of a slot)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from specserve.loading import load_model
from specserve.runtime.engine import Forward, run_forward
from specserve.runtime.llama_batch import LLAMA_MAX_SEQ

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed (make install builds it)")

PROMPTS = [[1000 + 7 * i + j for j in range(n)] for i, n in enumerate((40, 30, 300, 25, 20))]
# A tree of 7 nodes after the cache: 0 -> (1 -> (3, 4), 2 -> 5), 6 a second root.
TREE_TOKENS = [504, 3000, 77, 9, 281, 42, 1337]
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, -1]


@pytest.fixture(scope="module")
def engines():
    from specserve.runtime.llama_engine import LlamaEngine

    alone = load_model("smollm2", engine="llama.cpp", threads=2)  # the default: a private context per session
    shared = LlamaEngine("smollm2", alone.path, threads=2, batch_slots=16)
    yield shared, alone
    shared.close()
    alone.close()


def tree_forward(session, tokens: list[int], parents: list[int]) -> Forward:
    n = len(tokens)
    visible = torch.eye(n, dtype=torch.bool)  # [n, n]
    depth = [0] * n
    for i, p in enumerate(parents):
        if p >= 0:
            visible[i] |= visible[p]
            depth[i] = depth[p] + 1
    return Forward(session, tokens, logits_for=n, positions=[session.length + d for d in depth], visible=visible)


def mixed_forwards(sessions) -> list[Forward]:
    """A prefill, a decode row, a decode row with hidden states, a 5-token chain, a tree."""
    return [Forward(sessions[0], PROMPTS[0], logits_for=1),
            Forward(sessions[1], [281], logits_for=1),
            Forward(sessions[2], [42], logits_for=1, hidden=True),
            Forward(sessions[3], [5, 6, 7, 8, 9], logits_for=5),
            tree_forward(sessions[4], TREE_TOKENS, TREE_PARENTS)]


def open_sessions(engine):
    sessions = [engine.new_session() for _ in PROMPTS]
    for session, prompt in zip(sessions[1:], PROMPTS[1:]):
        session.extend(prompt)  # session 0 prefills inside the batch
    return sessions


def assert_same(batched, alone):
    (logits, hidden), (logits_alone, hidden_alone) = batched, alone
    assert logits.dtype == torch.float32 and logits.shape == logits_alone.shape
    assert logits.argmax(-1).tolist() == logits_alone.argmax(-1).tolist()
    torch.testing.assert_close(logits, logits_alone, rtol=0, atol=1e-4)
    assert (hidden is None) == (hidden_alone is None)
    if hidden is not None:
        torch.testing.assert_close(hidden, hidden_alone, rtol=0, atol=1e-4)


def greedy_steps(engine, sessions, first: list[int], steps: int, batched: bool) -> list[list[int]]:
    """`steps` greedy tokens per session, all sessions stepping together."""
    tokens = [[t] for t in first]
    for _ in range(steps):
        forwards = [Forward(s, [out[-1]]) for s, out in zip(sessions, tokens)]
        results = engine.forward_batch(forwards) if batched else [run_forward(f) for f in forwards]
        for out, (logits, _) in zip(tokens, results):
            out.append(int(logits[-1].argmax()))
    return tokens


def test_a_mixed_batch_equals_each_session_alone_and_caches_go_on_alike(engines):
    shared, alone = engines
    assert shared.supports_batching
    batch_sessions, alone_sessions = open_sessions(shared), open_sessions(alone)
    batched = shared.forward_batch(mixed_forwards(batch_sessions))
    single = [run_forward(f) for f in mixed_forwards(alone_sessions)]
    assert batched[2][1].shape == (1, shared.hidden_size) and batched[4][0].shape == (len(TREE_TOKENS), shared.vocab_size)
    for b, a in zip(batched, single):
        assert_same(b, a)
    assert [s.length for s in batch_sessions] == [s.length for s in alone_sessions]

    # The tree's greedy path is kept: the path through node 1 (children 3, 4) or 2.
    tree_logits = batched[4][0]
    start = len(PROMPTS[4])
    path = [0, 1, 3]
    for sessions in (batch_sessions, alone_sessions):
        sessions[4].keep(start, path)
        assert sessions[4].length == start + 3
    # Rollback after the batch: session 3 drops two of its five chain tokens.
    for sessions in (batch_sessions, alone_sessions):
        sessions[3].rollback(len(PROMPTS[3]) + 3)

    first = [int(batched[0][0][-1].argmax()), int(batched[1][0][-1].argmax()), int(batched[2][0][-1].argmax()),
             7, int(tree_logits[3].argmax())]
    went_on = greedy_steps(shared, batch_sessions, first, 6, batched=True)
    assert went_on == greedy_steps(alone, alone_sessions, first, 6, batched=False)

    # Closing frees the slots; new sessions take them and start from an empty cache.
    homes = len(shared._homes)
    for session in batch_sessions:
        session.close()
    assert sum(h.in_use for h in shared._homes) == 0
    assert all(len(h.free_tree_ids) == LLAMA_MAX_SEQ - h.slots for h in shared._homes)  # the tree's ids came back
    reused = shared.new_session()
    assert len(shared._homes) == homes
    fresh = alone.new_session()
    assert_same((reused.extend(PROMPTS[2], logits_for=2), None), (fresh.extend(PROMPTS[2], logits_for=2), None))
    reused.close()
    fresh.close()
    for session in alone_sessions:
        session.close()


def test_batches_span_contexts_and_chunks(engines):
    """Two slots a context: five sessions live in three contexts; 32-row decode calls split
    the prefill while the tree stays whole. The same results as alone."""
    from specserve.runtime.llama_engine import LlamaEngine

    _, alone = engines
    small = LlamaEngine("smollm2", alone.path, threads=2, batch_slots=2, batch_tokens=32)
    try:
        batch_sessions, alone_sessions = open_sessions(small), open_sessions(alone)
        assert len(small._homes) == 3
        batched = small.forward_batch(mixed_forwards(batch_sessions))
        for b, a in zip(batched, [run_forward(f) for f in mixed_forwards(alone_sessions)]):
            assert_same(b, a)
        for sessions in (batch_sessions, alone_sessions):
            sessions[4].rollback(len(PROMPTS[4]))  # the tree dropped
        first = [int(r[0][-1].argmax()) for r in batched]
        assert greedy_steps(small, batch_sessions, first, 3, True) == greedy_steps(alone, alone_sessions, first, 3, False)
        for session in batch_sessions + alone_sessions:
            session.close()
    finally:
        small.close()


def test_bad_batches_are_refused_and_leave_the_caches_alone(engines):
    shared, _ = engines
    a, b = shared.new_session(), shared.new_session()
    a.extend(PROMPTS[1])
    with pytest.raises(ValueError, match="once"):
        shared.forward_batch([Forward(a, [5]), Forward(a, [6])])
    too_long = [7] * (shared.max_context_tokens - a.length + 1)
    with pytest.raises(ValueError, match="context window"):
        shared.forward_batch([Forward(b, [5]), Forward(a, too_long)])
    assert (a.length, b.length) == (len(PROMPTS[1]), 0)
    closed = shared.new_session()
    closed.close()
    with pytest.raises(ValueError, match="open session"):
        shared.forward_batch([Forward(a, [5]), Forward(closed, [5])])
    # Still intact: a's next logits equal a fresh session's after the same tokens.
    fresh = shared.new_session()
    fresh.extend(PROMPTS[1])
    torch.testing.assert_close(shared.forward_batch([Forward(a, [5]), Forward(fresh, [5])])[0][0],
                               run_forward(Forward(b, PROMPTS[1] + [5]))[0], rtol=0, atol=1e-4)
    for session in (a, b, fresh):
        session.close()
