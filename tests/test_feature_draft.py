"""Feature drafts (EAGLE-style): the target's hidden states travel to the draft, in process
and over gRPC, and the output stays the target's own (fp32, greedy: token for token)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from specserve.client import build_request, connect, generate
from specserve.runtime.local import LocalFeatureDraftProposer, local_draft_proposer
from specserve.serving import hidden_states
from specserve.v1 import common_pb2, draft_pb2, draft_pb2_grpc, model_service_pb2, target_pb2, target_pb2_grpc
from specserve.v1 import orchestrator_pb2 as pb
from conftest import decode_locally, teacher_forced_hidden

PROMPTS = [[1, 504, 3000, 77, 504, 3000], list(range(100, 160))]
TEXT_PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox", "Once upon a time"]


# In process ------------------------------------------------------------------------------


def test_a_feature_draft_is_recognised(feature_draft):
    assert feature_draft.needs_target_hidden_states
    assert isinstance(local_draft_proposer(feature_draft), LocalFeatureDraftProposer)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_in_process_output_equals_plain_decoding(tiny_target, feature_draft, prompt):
    plain, _ = decode_locally(tiny_target, None, prompt)
    for k, fixed in ((1, True), (4, True), (8, True), (4, False)):
        tokens, stats = decode_locally(tiny_target, local_draft_proposer(feature_draft), prompt, k=k, fixed=fixed)
        assert tokens == plain, (k, fixed)
        assert stats.proposed_tokens > 0


def test_an_agreeing_feature_draft_is_accepted_and_exact(agreeing_pair):
    target, draft = agreeing_pair
    for prompt in PROMPTS:
        plain, _ = decode_locally(target, None, prompt, max_new=40)
        for k, fixed in ((1, True), (4, True), (8, True), (2, False)):
            tokens, stats = decode_locally(target, local_draft_proposer(draft), prompt, k=k, fixed=fixed, max_new=40)
            assert tokens == plain, (k, fixed)
            assert stats.accepted_tokens >= 0.9 * stats.proposed_tokens > 0, (k, fixed, stats)


def test_each_token_reaches_the_draft_with_the_hidden_state_before_it(tiny_target, feature_draft):
    """Adaptive K pauses speculation after rejections, so hidden states of several verifies pile up."""
    proposer = LocalFeatureDraftProposer(feature_draft)
    sent: list[tuple[int, list[int], torch.Tensor]] = []
    propose = proposer.worker.propose

    def recording_propose(committed_len, token_ids, k, hidden):
        sent.append((committed_len, list(token_ids), hidden.clone()))
        return propose(committed_len, token_ids, k, hidden)

    proposer.worker.propose = recording_propose
    prompt = PROMPTS[1]
    tokens, stats = decode_locally(tiny_target, proposer, prompt, k=1, fixed=False, max_new=40)
    sequence = prompt + tokens
    expected = teacher_forced_hidden(tiny_target, sequence)  # [n, H]
    assert sent[0][0] == 1 and len(sent[0][1]) == len(prompt)  # prompt[1:] and the first token
    assert any(len(token_ids) > 1 for _, token_ids, _ in sent[1:]), "no pause: nothing piled up"
    covered = 1
    for committed_len, token_ids, hidden in sent:
        assert committed_len == covered
        assert token_ids == sequence[committed_len:committed_len + len(token_ids)]
        torch.testing.assert_close(hidden, expected[committed_len - 1:committed_len - 1 + len(token_ids)], rtol=1e-4, atol=1e-4)
        covered += len(token_ids)


def test_bench_runners_with_a_feature_draft(tiny_target, feature_draft):
    from specserve.bench.cli import _warm_up
    from specserve.bench.runners.hf import HfRunner
    from specserve.bench.runners.in_process import InProcessRunner

    in_process = InProcessRunner(tiny_target, feature_draft, tokenizer=None)
    plain, _ = asyncio.run(in_process.decode_ids(PROMPTS[0], "autoregressive", 20, False))
    drafted, stats = asyncio.run(in_process.decode_ids(PROMPTS[0], "draft_model", 20, False))
    assert drafted == plain and stats.proposed_tokens > 0
    hf = HfRunner(tiny_target, tokenizer=None, draft=feature_draft)
    assert "feature draft" in hf.skip_reason("draft_model") and hf.skip_reason("prompt_lookup") is None
    notes: list[str] = []
    assert _warm_up([hf], ["draft_model"], None, notes) == []
    assert notes[0].startswith("hf/draft_model skipped: ")


def test_hidden_states_messages_round_trip():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden = torch.randn(3, 8).to(dtype)  # [n, H]
        message = hidden_states.to_proto(hidden)
        assert (message.rows, message.dim, len(message.data)) == (3, 8, 3 * 8 * hidden.element_size())
        assert torch.equal(hidden_states.from_proto(message), hidden)
        joined = hidden_states.concat([message, hidden_states.to_proto(hidden[:1])])
        assert torch.equal(hidden_states.from_proto(joined), torch.cat([hidden, hidden[:1]]))
    assert hidden_states.to_proto(torch.tensor([[1.0]])).data == b"\x00\x00\x80\x3f"  # little-endian


# Over gRPC -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(feature_stack):
    channel, stub = connect(feature_stack.address)
    yield stub
    channel.close()


def generation(stub, **kwargs):
    kwargs.setdefault("max_new_tokens", 30)
    return generate(stub, build_request(**kwargs), timeout_s=120)


def test_the_draft_service_says_it_needs_hidden_states(feature_stack):
    with grpc.insecure_channel(feature_stack.draft_address) as channel:
        info = draft_pb2_grpc.DraftServiceStub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=5)
    assert info.needs_target_hidden_states


@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_served_output_equals_autoregressive(stub, prompt):
    plain = generation(stub, prompt=prompt, method="autoregressive")
    assert len(plain.token_ids) == 30
    for k, fixed in ((1, True), (4, True), (4, False)):
        result = generation(stub, prompt=prompt, method="draft_model", num_speculative_tokens=k, fixed_length=fixed)
        assert result.token_ids == plain.token_ids, (k, fixed)
        assert result.stats.method == pb.DRAFT_MODEL
        assert result.stats.proposed_tokens > 0 and result.stats.draft_forward_passes > 0


def test_served_sampling_with_a_seed_is_reproducible(stub):
    a = generation(stub, prompt=TEXT_PROMPTS[0], method="draft_model", temperature=0.9, top_p=0.95, seed=11)
    b = generation(stub, prompt=TEXT_PROMPTS[0], method="draft_model", temperature=0.9, top_p=0.95, seed=11)
    assert a.token_ids == b.token_ids and a.stats.proposed_tokens > 0


def active_sessions(stack) -> tuple[int, int]:
    counts = []
    for address, stub_class in ((stack.target_address, target_pb2_grpc.TargetServiceStub),
                                (stack.draft_address, draft_pb2_grpc.DraftServiceStub)):
        with grpc.insecure_channel(address) as channel:
            counts.append(stub_class(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=5).active_sessions)
    return tuple(counts)


def wait_for_sessions(stack, expected=(0, 0), timeout_s=15.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while (counts := active_sessions(stack)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


def test_cancelling_mid_stream_leaves_no_session(feature_stack, stub):
    assert wait_for_sessions(feature_stack) == (0, 0)  # earlier tests' streams may still be closing
    call = stub.Generate(build_request(prompt=TEXT_PROMPTS[0], method="draft_model", max_new_tokens=400), timeout=120)
    next(call)  # both sessions are open now
    assert active_sessions(feature_stack) == (1, 1)
    call.cancel()
    assert wait_for_sessions(feature_stack) == (0, 0)


def test_served_target_hidden_states_equal_a_teacher_forced_forward(feature_stack, tiny_target):
    prompt = PROMPTS[1]
    plain, _ = decode_locally(tiny_target, None, prompt, max_new=8)
    ops = [
        target_pb2.TargetStart(prompt_token_ids=prompt, seed=0, return_hidden_states=True),
        target_pb2.TargetVerify(committed_len=len(prompt), token_ids=[plain[0], plain[1], plain[2], 7]),  # 2 accepted
        target_pb2.TargetVerify(committed_len=len(prompt) + 3, token_ids=[plain[3], 9, 9]),  # 9, 9: rejected, surely
        target_pb2.TargetVerify(committed_len=len(prompt) + 4, token_ids=[plain[4]]),
    ]
    requests = [target_pb2.TargetRequest(op_id=i, **{"start" if i == 0 else "verify": op}) for i, op in enumerate(ops)]
    with grpc.insecure_channel(feature_stack.target_address) as channel:
        responses = list(target_pb2_grpc.TargetServiceStub(channel).Session(iter(requests), timeout=60))
    assert [r.accepted for r in responses] == [0, 2, 0, 0]
    assert [r.hidden_states.rows for r in responses] == [len(prompt), 3, 1, 1]
    assert all(r.hidden_states.dtype == "float32" for r in responses)
    served = torch.cat([hidden_states.from_proto(r.hidden_states) for r in responses])  # [n, H]
    assert served.shape[0] == responses[-1].committed_len
    expected = teacher_forced_hidden(tiny_target, prompt + plain[:5])[: served.shape[0]]  # [n, H]
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)


def bad_hidden_states() -> list[common_pb2.HiddenStates]:
    good = hidden_states.to_proto(torch.zeros(3, 64))  # the tiny models' hidden size is 64
    wrong_rows = hidden_states.to_proto(torch.zeros(2, 64))
    wrong_dim = hidden_states.to_proto(torch.zeros(3, 32))
    unknown_dtype = common_pb2.HiddenStates(rows=3, dim=64, dtype="int8", data=bytes(3 * 64))
    short_data = common_pb2.HiddenStates(rows=3, dim=64, dtype="float32", data=good.data[:-4])
    return [wrong_rows, wrong_dim, unknown_dtype, short_data, common_pb2.HiddenStates()]


@pytest.mark.parametrize("bad", bad_hidden_states(), ids=["rows", "dim", "dtype", "size", "missing"])
def test_bad_hidden_states_are_invalid_argument(feature_stack, bad):
    start = draft_pb2.DraftStart(prompt_token_ids=[1, 2, 3], seed=0)
    propose = draft_pb2.DraftPropose(committed_len=1, token_ids=[2, 3, 4], num_tokens=2)
    if bad.ByteSize():
        propose.hidden_states.CopyFrom(bad)
    requests = [draft_pb2.DraftRequest(op_id=1, start=start), draft_pb2.DraftRequest(op_id=2, propose=propose)]
    with grpc.insecure_channel(feature_stack.draft_address) as channel:
        session = draft_pb2_grpc.DraftServiceStub(channel).Session(iter(requests), timeout=30)
        assert next(session).op_id == 1
        with pytest.raises(grpc.RpcError) as caught:
            next(session)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("hidden_states:"), caught.value.details()
