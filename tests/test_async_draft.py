"""Asynchronous drafting: the draft drafts the next step for the likeliest verdicts while the
target verifies this one. Greedy output stays token for token plain decoding's (in process and
through the stack, fp32); outcomes drafted for another record are dropped, never applied;
cancellation, deadlines, session limits and a draft replica killed all work with ops in flight."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time

import grpc
import pytest
import torch

from specserve.client import build_request, connect, generate
from specserve.core.adaptive import SpeculationLength
from specserve.core.async_decode import AheadStats, decode_ahead
from specserve.core.async_plan import AheadPlanner
from specserve.core.controller import CostPoint, CostProfile, CostTable
from specserve.core.outcomes import Outcome, OutcomeRequest, Speculation, choose_outcomes
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, decode
from specserve.launcher import Stack, StackConfig
from specserve.loading import load_model
from specserve.runtime.ahead import branch_op, speculate_op
from specserve.runtime.engine import run_alone
from specserve.runtime.local import LocalDraftProposer, LocalTargetSession
from specserve.runtime.workers import DraftWorker
from specserve.v1 import draft_pb2, draft_pb2_grpc, model_service_pb2, orchestrator_pb2 as pb, target_pb2_grpc

PROMPTS = [[1, 504, 3000, 77, 504, 3000], [9, 9, 9, 9], list(range(100, 160))]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Once upon a time",
]


def noisy_copy(directory, path, scale: float = 0.01):
    """The tiny target with every weight perturbed a little: a draft that agrees with it often."""
    from specserve.runtime.models import load_tokenizer

    model = load_model(str(directory)).model
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    model.save_pretrained(path)
    load_tokenizer("smollm2").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def noisy_draft_dir(tiny_target_dir, tmp_path_factory):
    return noisy_copy(tiny_target_dir, tmp_path_factory.mktemp("noisy-draft"))


@pytest.fixture(scope="module")
def drafts(tiny_target, tiny_draft_dir, noisy_draft_dir):
    """Drafts that agree always (the target itself), often (perturbed) and hardly ever (unrelated)."""
    return {"self": tiny_target, "noisy": load_model(str(noisy_draft_dir)), "unrelated": load_model(str(tiny_draft_dir))}


def run_local(target, proposer, prompt, mode=None, max_new=40, k=4):
    """(tokens, DecodeStats, AheadStats or None): `decode` (mode None) or `decode_ahead` in process."""
    request = DecodeRequest(prompt, SamplingConfig(max_new_tokens=max_new), 0, frozenset(), target.max_context_tokens,
                            SpeculationLength(k, k_max=16))
    ahead = AheadStats() if mode else None

    async def collect():
        session = LocalTargetSession(target)
        steps = decode(session, proposer, request) if mode is None else decode_ahead(
            session, proposer, request, AheadPlanner(mode, k, 16), ahead)
        return [t async for chunk in steps for t in chunk.tokens]

    return asyncio.run(collect()), request.stats, ahead


# ---- in process: the loop, the draft's branches, the planner ---------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("draft", ["self", "noisy", "unrelated"])
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_drafting_ahead_equals_plain_decoding(tiny_target, drafts, prompt, draft, mode):
    plain, _, _ = run_local(tiny_target, None, prompt)
    tokens, stats, ahead = run_local(tiny_target, LocalDraftProposer(drafts[draft]), prompt, mode)
    assert tokens == plain
    if mode == "on":
        assert ahead.pipelined_steps > 0 and ahead.stale_outcomes == 0
    if draft == "self" and mode == "on":  # the target's own guesses: every verdict after the first matches
        assert ahead.outcome_hits >= ahead.pipelined_steps - 1 > 0


class Misdated:
    """A real draft whose outcomes arrive labelled for a record `shift` tokens off (as if drafted
    before some other verdict): the loop must recognise them as stale and never apply them."""

    def __init__(self, inner: LocalDraftProposer, shift: int):
        self.inner, self.shift = inner, shift

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def speculate(self, sequence, proposal, outcomes, k) -> Speculation:
        got = await self.inner.speculate(sequence, proposal, outcomes, k)
        return Speculation([Outcome(o.accepted, o.token, o.context_len + self.shift, o.proposal) for o in got.outcomes],
                           got.compute_ms)


@pytest.mark.parametrize("shift", [-1, 1])
def test_stale_outcomes_are_dropped_never_applied(tiny_target, drafts, shift):
    plain, _, _ = run_local(tiny_target, None, PROMPTS[2])
    tokens, stats, ahead = run_local(tiny_target, Misdated(LocalDraftProposer(drafts["self"]), shift), PROMPTS[2], "on")
    assert tokens == plain
    assert ahead.outcome_hits == 0  # the target's own guesses would all have matched
    assert ahead.stale_outcomes == ahead.outcomes_drafted > 0


def test_each_branch_proposes_what_a_fresh_draft_would(drafts):
    """The outcomes drafted side by side (forked caches) propose what the draft proposes for that
    sequence from scratch, and the next op resumes from the branch its sequence continues."""
    draft = drafts["noisy"]
    sequence = list(range(200, 230))
    worker = DraftWorker(draft)
    worker.start(sequence[:-1], SamplingConfig(), 0)
    proposal, _ = worker.propose(len(sequence) - 1, sequence[-1:], 4)
    branches = run_alone(speculate_op(worker, len(sequence) + 4, [], 4, [(4, 2), (1, 1), (0, 1)], 3))
    assert [b.accepted for b in branches] == [4, 4, 1, 0]
    assert branches[2].token != proposal[1] and branches[3].token != proposal[0]  # a rejected proposal is never a guess
    assert not any(b.drafted for b in branches)  # several: the service drafts them side by side
    for branch in branches:
        run_alone(branch_op(worker, branch, 3))
    for branch in branches:
        context = sequence + proposal[:branch.accepted] + [branch.token]
        assert branch.context_len == len(context)
        fresh = DraftWorker(draft)
        fresh.start(context[:-1], SamplingConfig(), 0)
        assert branch.proposal == fresh.propose(len(context) - 1, context[-1:], 3)[0]
    # The verdict took the early stop: the next propose resumes from that branch's cache.
    chosen = branches[3]
    kept = worker.resume(len(sequence), [chosen.token, *chosen.proposal], room=3)
    assert kept == chosen.context_len + len(chosen.proposal) - 1  # all but the last proposal is cached
    assert worker.branches == []


def test_outcomes_chosen_likeliest_first():
    assert choose_outcomes(3, 0.9, 1) == [OutcomeRequest(3, 1)]  # all accepted, the bonus guessed
    # Low acceptance: stopping at the first proposal is likelier than reaching the end.
    assert choose_outcomes(4, 0.4, 3)[0].accepted == 0
    chosen = choose_outcomes(2, 0.8, 3)
    assert sum(o.guesses for o in chosen) == 3 and chosen[0] == OutcomeRequest(2, 1)
    # Unlikely outcomes are not drafted, however large the budget.
    assert sum(o.guesses for o in choose_outcomes(8, 0.97, 8)) < 8


def flat_costs(ms: float, role: str) -> CostProfile:
    table = CostTable.of([CostPoint(100, n, ms) for n in (1, 2, 4, 8, 16, 32)])
    return CostProfile(verify_chain=table) if role == "target" else CostProfile(draft_step=table)


@pytest.mark.parametrize("ratio, k_ahead", [(0.2, 4), (0.3, 2), (0.5, 1)])
def test_the_planner_hides_drafting_behind_verification(ratio, k_ahead):
    """GPU-like costs (a verify costs 20 ms whatever its length): drafting ahead pays, and the
    proposals drafted ahead are as long as the drafting hides behind the verify."""
    planner = AheadPlanner("auto", 4, 16, flat_costs(20.0, "target"), flat_costs(20.0 * ratio, "draft"))
    for _ in range(40):
        planner.observe_verdict(4, 3)  # acceptance 0.8
    plan = planner.plan(100)
    assert plan.pipelined and plan.k_ahead == k_ahead
    assert plan.expected_rate > 1.2 * plan.sync_rate


def test_outcomes_beside_the_likeliest_are_drafted_while_they_match_verdicts():
    planner = AheadPlanner("on", 4, 16)
    budgets = []
    for _ in range(40):  # three outcomes a step, and the verdict only ever matches the first
        budgets.append(planner.outcome_budget(3))
        planner.observe_outcomes(budgets[-1], 0)
    assert budgets[:3] == [3, 3, 3] and budgets[-16:].count(1) == 15  # then one, with a probe now and then
    for _ in range(10):  # outcomes beside the first match again (seen in the probes): all of them come back
        planner.observe_outcomes(3, 2)
    assert planner.outcome_budget(3) == 3


def test_auto_drafts_synchronously_where_drafting_ahead_does_not_pay():
    # A draft that costs nothing has nothing to hide; verifying long chains is then the better deal.
    cheap = AheadPlanner("auto", 4, 16, flat_costs(20.0, "target"), flat_costs(0.01, "draft"))
    assert not cheap.plan(100).pipelined
    # Target and draft on one CPU compete for its cores: auto does not overlap them, on does.
    shared = dict(target=flat_costs(20.0, "target"), draft=flat_costs(6.0, "draft"), shared_cores=True)
    assert not AheadPlanner("auto", 4, 16, **shared).plan(100).pipelined
    assert AheadPlanner("on", 4, 16, **shared).plan(100).pipelined
    # Costs not known yet (no profile, nothing measured): auto starts synchronously, on does not.
    assert not AheadPlanner("auto", 4, 16).plan(10).pipelined
    assert AheadPlanner("on", 4, 16).plan(10).pipelined


# ---- through the stack (real gRPC services on loopback) ---------------------------------------

@pytest.fixture(scope="module")
def ahead_stack(tiny_target_dir, noisy_draft_dir, tmp_path_factory):
    """Tiny target and its perturbed copy as the draft, fp32."""
    config = StackConfig(target_model=str(tiny_target_dir), draft_model=str(noisy_draft_dir), dtype="float32", port=0,
                         redis="off", default_method="draft_model", threads=1, async_draft="on",
                         log_dir=tmp_path_factory.mktemp("ahead-stack-logs"),
                         extra_env={"SPECSERVE_CACHE": str(tmp_path_factory.mktemp("ahead-stack-cache"))})
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        yield stack, stub
        channel.close()


def run(stub, **kwargs):
    kwargs.setdefault("max_new_tokens", 40)
    return generate(stub, build_request(**kwargs), timeout_s=120)


@pytest.mark.parametrize("prompt", TEXTS)
def test_greedy_output_through_the_stack_equals_autoregressive(ahead_stack, prompt):
    _, stub = ahead_stack
    plain = run(stub, prompt=prompt, method="autoregressive")
    for mode in ("on", "auto", "off"):
        for k in (1, 4):
            result = run(stub, prompt=prompt, method="draft_model", async_draft=mode, num_speculative_tokens=k)
            assert result.token_ids == plain.token_ids, (mode, k)
            assert result.stats.stale_outcomes == 0
            if mode == "auto":  # target and draft on this machine's CPU: auto runs synchronously, and says why
                assert not result.stats.async_draft and "share its cores" in result.stats.synchronous_reason
            if mode == "on":
                assert result.stats.async_draft and result.stats.outcomes_drafted > 0
                assert 0 <= result.stats.draft_exposed_ms <= result.stats.draft_compute_ms
            if mode == "off":
                assert not result.stats.async_draft and result.stats.outcomes_drafted == 0
                assert result.stats.synchronous_reason == ""
    hits = run(stub, prompt=prompt, method="draft_model", async_draft="on").stats.outcome_hits
    assert hits > 0  # the perturbed draft's guesses often match


def test_sampled_requests_draft_synchronously_and_say_so(ahead_stack):
    _, stub = ahead_stack
    runs = [run(stub, prompt=TEXTS[0], method="draft_model", async_draft="on", temperature=0.9, seed=3) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids  # seeded: reproducible
    assert not runs[0].stats.async_draft and "sampled" in runs[0].stats.synchronous_reason
    other = run(stub, prompt=TEXTS[0], method="prompt_lookup", async_draft="on")
    assert "DRAFT_MODEL" in other.stats.synchronous_reason


def draft_session(address: str, ops: list[draft_pb2.DraftRequest]) -> tuple[list, grpc.RpcError | None]:
    """Sends ops on one draft session; (responses, the error that ended it or None)."""
    with grpc.insecure_channel(address) as channel:
        responses = []
        try:
            for response in draft_pb2_grpc.DraftServiceStub(channel).Session(iter(ops), timeout=30):
                responses.append(response)
        except grpc.RpcError as error:
            return responses, error
        return responses, None


def start(op_id: int, temperature: float = 0.0) -> draft_pb2.DraftRequest:
    from specserve.v1 import common_pb2

    return draft_pb2.DraftRequest(op_id=op_id, start=draft_pb2.DraftStart(
        prompt_token_ids=[1, 2, 3, 4], seed=0, sampling=common_pb2.SamplingParams(temperature=temperature)))


def speculate(op_id: int, **fields) -> draft_pb2.DraftRequest:
    values = dict(committed_len=4, proposal_len=0, num_tokens=3, outcomes=[draft_pb2.OutcomeGuesses(accepted=0, guesses=2)])
    values.update(fields)
    return draft_pb2.DraftRequest(op_id=op_id, speculate=draft_pb2.DraftSpeculate(**values))


def test_the_draft_service_drafts_outcomes_and_refuses_bad_ones(ahead_stack):
    stack, _ = ahead_stack
    responses, error = draft_session(stack.draft_address, [start(1), speculate(2)])
    assert error is None
    outcomes = responses[1].outcomes
    assert [(o.accepted, o.context_len, len(o.token_ids)) for o in outcomes] == [(0, 5, 3), (0, 5, 3)]
    assert outcomes[0].token_id != outcomes[1].token_id
    bad = [
        ([speculate(1)], grpc.StatusCode.FAILED_PRECONDITION, "the session has not started"),
        ([start(1), speculate(2, proposal_len=4)], grpc.StatusCode.INVALID_ARGUMENT, "speculate.proposal_len"),
        ([start(1), speculate(2, outcomes=[draft_pb2.OutcomeGuesses(accepted=1, guesses=1)])],
         grpc.StatusCode.INVALID_ARGUMENT, "speculate.outcomes[0].accepted"),
        ([start(1), speculate(2, outcomes=[draft_pb2.OutcomeGuesses(accepted=0, guesses=5)])],
         grpc.StatusCode.INVALID_ARGUMENT, "speculate.outcomes[0].guesses"),
        ([start(1), speculate(2, outcomes=[])], grpc.StatusCode.INVALID_ARGUMENT, "speculate.outcomes"),
        ([start(1), speculate(2, num_tokens=0)], grpc.StatusCode.INVALID_ARGUMENT, "speculate.num_tokens"),
        ([start(1), speculate(2, committed_len=9)], grpc.StatusCode.FAILED_PRECONDITION, "committed_len"),
        ([start(1, temperature=0.8), speculate(2)], grpc.StatusCode.INVALID_ARGUMENT, "speculate: drafting ahead serves greedy"),
    ]
    for ops, code, details in bad:
        _, error = draft_session(stack.draft_address, ops)
        assert error is not None and error.code() == code, details
        assert error.details().startswith(details), error.details()


# ---- ops in flight: cancellation, deadlines, limits, a draft replica killed ------------------

TARGET_STEP_MS = 40  # simulated: every target forward pass sleeps this long, every draft pass 0.3 of it


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory):
    """Simulated models (forward passes that sleep): two target replicas of one session each, two
    draft replicas of two."""
    config = StackConfig(
        target_model=f"sim:role=target,step_ms={TARGET_STEP_MS}",
        draft_model=f"sim:role=draft,step_ms={TARGET_STEP_MS * 0.3:g},accept=0.8", tokenizer="smollm2", dtype="float32",
        port=0, redis="off", default_method="draft_model", threads=1, target_replicas=2, draft_replicas=2,
        async_draft="on", log_dir=tmp_path_factory.mktemp("sim-ahead-logs"),
        extra_env={"SPECSERVE_TARGET_MAX_SESSIONS": "1", "SPECSERVE_DRAFT_MAX_SESSIONS": "2"},
    )
    with Stack(config) as stack:
        yield stack


IDLE = [0, 0, 0, 0]  # no session on either target replica or either draft replica


def sessions(stack) -> list[int]:
    """Active sessions on each target replica, then on each draft replica."""
    counts = []
    for address, stub_class in [*[(a, target_pb2_grpc.TargetServiceStub) for a in stack.target_addresses],
                                *[(a, draft_pb2_grpc.DraftServiceStub) for a in stack.draft_addresses]]:
        try:
            with grpc.insecure_channel(address) as channel:
                counts.append(stub_class(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=5).active_sessions)
        except grpc.RpcError:
            counts.append(0)  # a replica killed by an earlier test holds nothing
    return counts


def wait_idle(stack, timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(counts := sessions(stack)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


def test_cancelling_with_ops_in_flight_frees_every_session(sim_stack):
    channel, stub = connect(sim_stack.address)
    with channel:
        call = stub.Generate(build_request(prompt="Hello", max_new_tokens=2000), timeout=120)
        responses = [next(call) for _ in range(4)]
        # A step's tokens are streamed once the next step's verify (and its drafting ahead) went out.
        assert all(r.token_ids for r in responses)
        assert sum(sessions(sim_stack)[:2]) == 1
        call.cancel()
    assert wait_idle(sim_stack) == IDLE


def test_a_deadline_with_ops_in_flight_ends_the_request_and_frees_its_sessions(sim_stack):
    channel, stub = connect(sim_stack.address)
    with channel, pytest.raises(grpc.RpcError) as caught:
        generate(stub, build_request(prompt="Hello", max_new_tokens=2000), timeout_s=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(sim_stack) == IDLE


def streams(address: str, count: int, kill=None, max_new_tokens: int = 120) -> list:
    """`count` greedy streams at once; `kill()` runs once each has its first tokens."""
    pool = concurrent.futures.ThreadPoolExecutor(count)
    seen = [0] * count

    def one(i):
        channel, stub = connect(address)
        with channel:
            request = build_request(prompt=f"Stream {i} says", max_new_tokens=max_new_tokens)
            return generate(stub, request, on_text=lambda _t, i=i: seen.__setitem__(i, seen[i] + 1), timeout_s=120)

    futures = [pool.submit(one, i) for i in range(count)]
    if kill is not None:
        deadline = time.monotonic() + 60
        while not all(seen) and time.monotonic() < deadline:
            time.sleep(0.005)
        kill()
    results = [f.result() for f in futures]
    pool.shutdown()
    return results


def test_requests_beyond_the_session_limits_wait_and_stay_exact(sim_stack):
    # Four streams, two target sessions (one per replica) and four draft sessions at most: two wait.
    results = streams(sim_stack.address, 4, max_new_tokens=40)
    expected = streams(sim_stack.address, 1, max_new_tokens=40)[0]
    assert results[0].token_ids == expected.token_ids  # the same prompt as the lone stream
    assert all(r.stats.async_draft and r.stats.generated_tokens == 40 for r in results)
    assert wait_idle(sim_stack) == IDLE


def test_outcomes_drafted_ahead_match_the_verdicts_through_the_stack(sim_stack):
    """Fixed K = 2 against a draft right 80% of the time: a step's verdict matches the outcome drafted
    ahead when both proposals are accepted and the bonus token guessed, 0.8^3 = 0.51 of the steps."""
    channel, stub = connect(sim_stack.address)
    with channel:
        stats = generate(stub, build_request(prompt="Count with me", max_new_tokens=160, num_speculative_tokens=2,
                                             fixed_length=True), timeout_s=120).stats
    assert stats.async_draft and stats.stale_outcomes == 0
    assert stats.outcome_hits >= 0.35 * (stats.target_forward_passes - 2)


def test_a_target_and_a_draft_replica_killed_with_ops_in_flight_cost_nothing(sim_stack):
    """Two streams, one on each target and each draft replica (least loaded first); target-0 and
    draft-0 are killed while verifies and drafting ahead are in flight."""
    fault_free = streams(sim_stack.address, 2)
    victims = [sim_stack.process("target-0"), sim_stack.process("draft-0")]
    results = streams(sim_stack.address, 2, kill=lambda: [v.send_signal(signal.SIGKILL) for v in victims])
    assert [r.token_ids for r in results] == [r.token_ids for r in fault_free]
    assert sum(r.stats.failovers for r in results) >= 2  # a target session and a draft session moved
    assert all(r.stats.async_draft for r in results)
    assert wait_idle(sim_stack) == IDLE


@pytest.mark.slow
def test_smollm2_with_its_token_draft_drafting_ahead_equals_autoregressive(tmp_path_factory):
    """The real default model (fp32, torch) with the shipped token draft, through every service."""
    from specserve.runtime.models import SHIPPED_DRAFT

    config = StackConfig(target_model="smollm2", draft_model=str(SHIPPED_DRAFT), dtype="float32", engine="torch", port=0,
                         redis="off", default_method="draft_model", threads=1, async_draft="on",
                         log_dir=tmp_path_factory.mktemp("smollm2-ahead-logs"))
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        with channel:
            for prompt in (dict(messages=messages), dict(prompt="def fibonacci(n):")):
                plain = run(stub, method="autoregressive", max_new_tokens=32, **prompt)
                ahead = run(stub, method="draft_model", max_new_tokens=32, async_draft="on", **prompt)
                assert ahead.token_ids == plain.token_ids
                assert ahead.stats.async_draft and ahead.stats.outcomes_drafted > 0
