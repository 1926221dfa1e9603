"""Continuous batching: many sessions' ops in shared forward passes give each session exactly
what it gets alone (fp32), through the scheduler and through the served stack."""

from __future__ import annotations

import random
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest
import torch

from specserve.core.sampling import SamplingConfig
from specserve.core.tree import DraftTree
from specserve.runtime.engine import Forward, run_alone, run_forward
from specserve.runtime.lookahead_worker import lookahead_op
from specserve.runtime.scheduler import BatchScheduler
from specserve.runtime.workers import DraftWorker, TargetWorker
from conftest import plain_greedy

STEPS = 6


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Lengths from a few tokens to a prompt longer than the token budget (chunked prefill).
    return [[rng.randrange(17, 40000) for _ in range(n)] for n in (3, 150, 9, 40, 5, 77)[:count]]


def alone_and_together(engine, inputs: list, script, token_budget: int):
    """Runs script(input, run) for each input alone (run = run_alone), then for all inputs at
    once from threads through one BatchScheduler; (alone outputs, batched outputs, passes)."""
    alone = [script(item, lambda op, owner: run_alone(op)) for item in inputs]
    passes = []
    scheduler = BatchScheduler(engine, token_budget=token_budget, on_pass=passes.append)
    barrier = threading.Barrier(len(inputs))

    def scheduled(item):
        barrier.wait()
        return script(item, lambda op, owner: scheduler.submit_op(op, owner).result(timeout=60))

    try:
        with ThreadPoolExecutor(len(inputs)) as pool:
            batched = list(pool.map(scheduled, inputs))
    finally:
        scheduler.close()
    return alone, batched, passes


def session_script(target, prompt: list[int], plain: list[int], kind: int, run) -> tuple[list, int]:
    """One session's ops: start, then verify chains, trees and lookahead steps built from the
    plain continuation with wrong tokens mixed in. `run` runs an op (alone or scheduled).
    Returns (every op's output, the final cache length)."""
    rng = random.Random(kind)
    sampling = SamplingConfig(temperature=0.8, top_k=20) if kind == 5 else SamplingConfig()
    worker = TargetWorker(target)
    outputs = [run(worker.start_op(prompt, sampling, 7), worker)]
    out = outputs[:1]
    for step in range(STEPS):
        committed = len(prompt) + len(out) - 1
        ahead = plain[len(out): len(out) + 4]
        if step % 2:
            ahead = ahead[:2] + [rng.randrange(17, 40000)]
        kind_of_step = (kind + step) % 3 if sampling.greedy else 0
        if kind_of_step == 0 or len(ahead) < 2:
            verdict = run(worker.verify_op(committed, [out[-1], *ahead], None), worker)
        elif kind_of_step == 1:  # a tree: the continuation's path plus a wrong sibling at each depth
            tokens, parents = [], []
            for d, token in enumerate(ahead[:3]):
                parents += [2 * d - 2, 2 * d - 2] if d else [-1, -1]
                tokens += [token, rng.randrange(17, 40000)]
            verdict = run(worker.verify_tree_op(committed, out[-1], DraftTree(tokens, parents)), worker)
        else:
            levels = [[rng.randrange(17, 40000) for _ in range(3)] for _ in range(2)]
            verdict = run(lookahead_op(worker, committed, out[-1], levels, [ahead[:3], ahead[:1]]), worker).verdict
        outputs.append((verdict.accepted, verdict.tokens))
        out += verdict.tokens
    return outputs, worker.kv.length


def test_mixed_ops_in_shared_passes_equal_each_session_alone(tiny_target):
    """Chains, trees, lookahead steps, a sampled session and a prefill longer than the budget
    share forward passes; every op's output equals the same session run alone."""
    assert tiny_target.supports_batching
    items = prompts(6)
    plains = [plain_greedy(tiny_target, p, 40) for p in items]
    alone, batched, passes = alone_and_together(
        tiny_target, list(range(len(items))),
        lambda kind, run: session_script(tiny_target, items[kind], plains[kind], kind, run), token_budget=32)
    for kind, (outputs, _) in enumerate(alone):  # greedy sessions follow plain decoding exactly
        if kind != 5:
            tokens = [outputs[0]] + [t for _, step in outputs[1:] for t in step]
            assert tokens == plains[kind][: len(tokens)]
    assert batched == alone
    assert max(p.sessions for p in passes) >= 3  # sessions really shared passes
    assert all(p.tokens <= 32 for p in passes)  # the 150-token prompt was prefilled in chunks


def test_draft_proposals_in_shared_passes_equal_each_alone(tiny_draft_dir):
    from specserve.loading import load_model

    draft = load_model(str(tiny_draft_dir))
    items = prompts(4, seed=3)

    def script(prompt, run):
        worker = DraftWorker(draft)
        run(worker.start_op(prompt, SamplingConfig(), 0), worker)
        first = run(worker.propose_op(len(prompt), [prompt[-1]], 5), worker)
        second = run(worker.propose_op(len(prompt) + 2, first[0][:2], 3), worker)
        return first, second

    alone, batched, passes = alone_and_together(draft, items, script, token_budget=64)
    assert batched == alone
    assert max(p.sessions for p in passes) >= 2


def test_forward_batch_matches_each_forward_alone(tiny_target):
    """The engine level: logits and hidden states of a ragged batch (a prefill, decode rows, a
    chain and a tree) equal each session's own, and the caches continue identically."""
    items = prompts(4, seed=5)
    visible = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # a root and two children

    def forwards(sessions):
        return [
            Forward(sessions[0], items[0], logits_for=2, hidden=True),
            Forward(sessions[1], [11], logits_for=1),
            Forward(sessions[2], [12, 13, 14], logits_for=3),
            Forward(sessions[3], [15, 16, 17], logits_for=3, hidden=True,
                    positions=[len(items[3]), len(items[3]) + 1, len(items[3]) + 1], visible=visible),
        ]

    def prepared():
        sessions = [tiny_target.new_session() for _ in items]
        for session, prompt in zip(sessions[1:], items[1:]):
            run_forward(Forward(session, prompt, logits_for=0))
        return sessions

    alone_sessions, batch_sessions = prepared(), prepared()
    alone = [run_forward(f) for f in forwards(alone_sessions)]
    batched = tiny_target.forward_batch(forwards(batch_sessions))
    for (l1, h1), (l2, h2) in zip(alone, batched):
        torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-4)
        assert (h1 is None) == (h2 is None)
        if h1 is not None:
            torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-4)
    for a, b in zip(alone_sessions, batch_sessions):
        assert a.length == b.length
    # Keep the tree's first path, then one more token everywhere: the same logits again.
    for sessions in (alone_sessions, batch_sessions):
        sessions[3].keep(len(items[3]), [0, 1])
    after_alone = [run_forward(Forward(s, [99]))[0] for s in alone_sessions]
    after_batch = [r[0] for r in tiny_target.forward_batch([Forward(s, [99]) for s in batch_sessions])]
    for a, b in zip(after_alone, after_batch):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_closing_a_session_drops_its_waiting_op(tiny_target):
    """A session closed while its op waits between passes ends that op (no forward on a
    closed cache, no stuck caller) and the scheduler goes on serving others."""
    scheduler = BatchScheduler(tiny_target, token_budget=8)
    running, release = threading.Event(), threading.Event()
    try:
        scheduler.submit_call(lambda: (running.set(), release.wait(30)))  # holds the model thread
        assert running.wait(30)
        worker = TargetWorker(tiny_target)
        started = scheduler.submit_op(worker.start_op(prompts(2)[1], SamplingConfig(), 0), worker)
        closed = scheduler.submit_call(worker.close, drop_ops_of=worker)
        release.set()
        closed.result(timeout=30)
        with pytest.raises(CancelledError):
            started.result(timeout=30)
        other = TargetWorker(tiny_target)
        token = scheduler.submit_op(other.start_op([5, 6, 7], SamplingConfig(), 0), other).result(timeout=30)
        assert token == TargetWorker(tiny_target).start([5, 6, 7], SamplingConfig(), 0)
    finally:
        scheduler.close()


SERVED_PROMPTS = [
    "Write a short note to a neighbour about a parcel.",
    "List three uses of a paperclip:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The river rose all night, and by morning",
]


def test_concurrent_streams_through_the_api_equal_single_client_runs(tiny_stack):
    """Streams of different methods and a seeded sampled one, in flight together through the
    orchestrator, get what each gets alone; the target reports that it batches."""
    from specserve.client import build_request, connect, generate
    from specserve.v1 import model_service_pb2, target_pb2_grpc

    import grpc

    requests = [dict(prompt=p, method=m, max_new_tokens=24)
                for p in SERVED_PROMPTS for m in ("autoregressive", "prompt_lookup", "draft_model", "lookahead")]
    requests += [dict(prompt=SERVED_PROMPTS[0], method="draft_model", temperature=0.9, seed=11, max_new_tokens=24),
                 dict(prompt=SERVED_PROMPTS[2], method="prompt_lookup", temperature=0.7, seed=5, max_new_tokens=24)]
    channel, stub = connect(tiny_stack.address)
    try:
        alone = [list(generate(stub, build_request(**r), timeout_s=120).token_ids) for r in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: list(generate(stub, build_request(**r), timeout_s=120).token_ids), requests))
    finally:
        channel.close()
    assert together == alone
    for i in range(0, 16, 4):  # greedy: every method gives plain decoding's tokens
        assert alone[i] == alone[i + 1] == alone[i + 2] == alone[i + 3]
    with grpc.insecure_channel(tiny_stack.target_address) as target_channel:
        info = target_pb2_grpc.TargetServiceStub(target_channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=10)
    assert info.batch_token_budget > 0 and info.mean_batch_tokens > 0


def test_feature_draft_proposals_in_shared_passes_equal_each_alone(tiny_target, feature_draft):
    """A feature draft's chains and trees (its rows carry the target's hidden states) from
    several sessions in shared passes: the same proposals as each session alone."""
    from conftest import teacher_forced_hidden

    from specserve.core.tree import TreeShape
    from specserve.runtime.workers import FeatureDraftWorker

    assert feature_draft.supports_batching
    items = prompts(4, seed=9)
    shape = TreeShape(depth=3, width=2, branch=2, nodes=6)

    def script(prompt, run):
        worker = FeatureDraftWorker(feature_draft)
        worker.start(prompt, SamplingConfig(), 0)
        hidden = teacher_forced_hidden(tiny_target, prompt)  # [n, H]: the state before each next token
        chain = run(worker.propose_op(1, prompt[1:], 4, hidden[:-1]), worker)
        tree = run(worker.propose_tree_op(len(prompt), [chain[0][0]], hidden[-1:], shape), worker)
        return chain, (tree.tokens, tree.parents)

    alone, batched, passes = alone_and_together(feature_draft, items, script, token_budget=64)
    assert batched == alone
    assert max(p.sessions for p in passes) >= 2
