"""Sessions with one target or draft replica over gRPC, as the core loop's interfaces.

A session is one stream and stays on the replica that took it; which replica
takes it, and what happens when that replica fails, is `replicas` and `failover`.
"""

from __future__ import annotations

import asyncio

import grpc

from specserve.core.acceptance import Verdict
from specserve.core.outcomes import Outcome, OutcomeRequest, Speculation
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DraftSequenceTracker, Proposal
from specserve.core.tree import TreeShape
from specserve.serving import hidden_states
from specserve.serving.grpc_server import UpstreamError
from specserve.v1 import common_pb2, draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc


def _sampling_proto(sampling: SamplingConfig) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)


class _Stream:
    """One bidi Session stream: write an op, read its answer. Failures keep their status."""

    def __init__(self, name: str, call: grpc.aio.StreamStreamCall):
        self.name = name
        self.call = call
        self.next_op = 0
        self.in_flight = False  # one op at a time: responses are matched to ops by order

    def op_id(self) -> int:
        self.next_op += 1
        return self.next_op

    async def request(self, message):
        if self.in_flight:
            raise RuntimeError(f"{self.name} session: an op is already in flight")
        self.in_flight = True
        try:
            return await self._request(message)
        finally:
            self.in_flight = False

    async def _request(self, message):
        try:
            await self.call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            # The stream ended before the op went out: the service refused the session (full) or
            # dropped it. gRPC may report only "Internal error from Core" here; the stream's own
            # status, when it has one, says which.
            code = await self.call.code()
            if code in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED):
                code = grpc.StatusCode.UNAVAILABLE
            raise UpstreamError(code, f"{self.name} service ended the session before the op was sent: "
                                      f"{await self.call.details()}", unsent=True) from error
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as error:
            raise UpstreamError(error.code(), f"{self.name} service: {error.details()}") from error
        if response is grpc.aio.EOF:
            code = await self.call.code()
            raise UpstreamError(code, f"{self.name} service ended the session: {await self.call.details()}")
        return response

    def close(self) -> None:
        # Cancelling ends the stream on the service side, which frees the session's cache.
        self.call.cancel()


class RemoteTargetSession:
    """timeout_s: the stream's deadline (the client's, propagated); None: none."""

    def __init__(self, stub: target_pb2_grpc.TargetServiceStub, timeout_s: float | None = None):
        self.stub = stub
        self.timeout_s = timeout_s
        self.stream: _Stream | None = None
        self.last_compute_ms = 0.0
        self.last_batch_tokens = 0  # tokens in the target's forward pass of the last op, ours included
        # The last response's HiddenStates message, when the start op asked for them.
        self.last_hidden_states: common_pb2.HiddenStates | None = None
        self.last_candidates: Proposal | None = None

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False,
                    medusa: common_pb2.MedusaParams | None = None) -> int:
        self.stream = _Stream("target", self.stub.Session(timeout=self.timeout_s))
        start = target_pb2.TargetStart(prompt_token_ids=prompt, sampling=_sampling_proto(sampling), seed=seed,
                                       return_hidden_states=return_hidden_states)
        if medusa is not None:
            start.medusa.CopyFrom(medusa)
        response = await self._request(target_pb2.TargetRequest(op_id=self.stream.op_id(), start=start))
        return response.token_ids[0]

    async def verify(self, committed_len: int, tokens: list[int], draft_probs, parents: list[int] | None = None) -> Verdict:
        # draft_probs are the draft service's SparseDistribution messages, forwarded as they came.
        verify = target_pb2.TargetVerify(committed_len=committed_len, token_ids=tokens, draft_probs=draft_probs or [],
                                         parents=parents or [])
        response = await self._request(target_pb2.TargetRequest(op_id=self.stream.op_id(), verify=verify))
        self.last_compute_ms = response.compute_ms
        return Verdict(response.accepted, list(response.token_ids))

    async def lookahead(self, committed_len: int, pending: int, levels: list[list[int]],
                        candidates: list[list[int]]) -> tuple[Verdict, list[int]]:
        step = target_pb2.TargetLookahead(
            committed_len=committed_len, pending_token=pending, window=len(levels[0]),
            window_tokens=[t for level in levels for t in level],
            candidate_tokens=[t for candidate in candidates for t in candidate],
            candidate_lengths=[len(candidate) for candidate in candidates])
        response = await self._request(target_pb2.TargetRequest(op_id=self.stream.op_id(), lookahead=step))
        self.last_compute_ms = response.compute_ms
        return Verdict(response.accepted, list(response.token_ids)), list(response.lookahead_tokens)

    async def _request(self, request: target_pb2.TargetRequest) -> target_pb2.TargetResponse:
        response = await self.stream.request(request)
        self.last_batch_tokens = response.batch_tokens
        self.last_hidden_states = response.hidden_states if response.HasField("hidden_states") else None
        # A Medusa session's next candidates, computed by the heads beside the target.
        self.last_candidates = None
        if response.HasField("medusa_candidates"):
            candidates = response.medusa_candidates
            self.last_candidates = Proposal(list(candidates.token_ids), None, list(candidates.parents) or None)
        return response

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class RemoteDraftProposer:
    """timeout_s: the stream's deadline (the client's, propagated); None: none."""

    def __init__(self, stub: draft_pb2_grpc.DraftServiceStub, timeout_s: float | None = None):
        self.stub = stub
        self.timeout_s = timeout_s
        self.stream: _Stream | None = None
        self.tracker = DraftSequenceTracker()
        self.forward_passes = 0
        self.last_compute_ms = 0.0

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        self.stream = _Stream("draft", self.stub.Session(timeout=self.timeout_s))
        start = draft_pb2.DraftStart(prompt_token_ids=prompt, sampling=_sampling_proto(sampling), seed=seed)
        response = await self.stream.request(draft_pb2.DraftRequest(op_id=self.stream.op_id(), start=start))
        self.forward_passes += response.forward_passes
        self.tracker.reset(prompt)

    async def propose(self, sequence: list[int], k: int) -> Proposal:
        committed, append = self.tracker.diff(sequence)
        proposal = await self._propose(draft_pb2.DraftPropose(committed_len=committed, token_ids=append, num_tokens=k))
        self.tracker.record(sequence, proposal.tokens)
        return proposal

    async def speculate(self, sequence: list[int], proposal: Proposal, outcomes: list[OutcomeRequest], k: int) -> Speculation:
        """Drafts ahead while `proposal` (following `sequence`) is verified: k tokens per outcome."""
        base = len(sequence)  # the record before the proposal; the caller's list may grow meanwhile
        drafted = sequence + proposal.tokens
        committed, append = self.tracker.diff(drafted)
        speculate = draft_pb2.DraftSpeculate(
            committed_len=committed, token_ids=append, proposal_len=len(proposal.tokens), num_tokens=k,
            outcomes=[draft_pb2.OutcomeGuesses(accepted=o.accepted, guesses=o.guesses) for o in outcomes])
        response = await self.stream.request(draft_pb2.DraftRequest(op_id=self.stream.op_id(), speculate=speculate))
        self.forward_passes += response.forward_passes
        self.last_compute_ms = response.compute_ms
        drafted_outcomes = [Outcome(o.accepted, o.token_id, o.context_len, Proposal(list(o.token_ids))) for o in response.outcomes]
        # The draft's sequence is now its first outcome's (see DraftSpeculate).
        first = drafted_outcomes[0] if drafted_outcomes else None
        held = drafted if first is None else drafted[:base + first.accepted] + [first.token, *first.proposal.tokens]
        self.tracker.record_ahead(drafted[:base], held)
        return Speculation(drafted_outcomes, response.compute_ms)

    async def _propose(self, propose: draft_pb2.DraftPropose) -> Proposal:
        response = await self.stream.request(draft_pb2.DraftRequest(op_id=self.stream.op_id(), propose=propose))
        self.forward_passes += response.forward_passes
        self.last_compute_ms = response.compute_ms
        return Proposal(list(response.token_ids), list(response.probs) or None, list(response.parents) or None)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class RemoteFeatureDraftProposer(RemoteDraftProposer):
    """A feature draft service: each propose sends the tokens since the last one with
    the target's hidden states received since then (one row per token), the
    messages' bytes joined as they came.

    With a tree shape (nodes > 0), greedy requests get trees of depth k in that shape;
    sampled requests, and every request without a shape, get chains."""

    needs_target_hidden_states = True

    def __init__(self, stub: draft_pb2_grpc.DraftServiceStub, tree: TreeShape | None = None, timeout_s: float | None = None):
        super().__init__(stub, timeout_s)
        self.pending: list[common_pb2.HiddenStates] = []  # not yet sent, in order
        self.tree = tree if tree is not None and tree.nodes > 0 else None
        self.drafts_trees = False  # decided per request, at start

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        await super().start(prompt, sampling, seed)
        self.tracker.reset(prompt[:1])  # the rest of the prompt arrives with the target's hidden states
        self.drafts_trees = self.tree is not None and sampling.greedy

    def observe_target_hidden_states(self, hidden: common_pb2.HiddenStates | None) -> None:
        if hidden is None:
            raise RuntimeError("the target service returned no hidden states for a feature draft")
        self.pending.append(hidden)

    async def propose(self, sequence: list[int], k: int, nodes: int | None = None) -> Proposal:
        committed, append = self.tracker.diff(sequence)
        joined = hidden_states.concat(self.pending)  # [len(append), H]
        self.pending = []
        propose = draft_pb2.DraftPropose(committed_len=committed, token_ids=append, num_tokens=k, hidden_states=joined)
        if self.drafts_trees:
            propose.tree.CopyFrom(draft_pb2.TreeShape(depth=k, width=self.tree.width, branch=self.tree.branch,
                                                   nodes=nodes or self.tree.nodes))
        proposal = await self._propose(propose)
        self.tracker.record(sequence, [])  # proposals are not kept
        return proposal
