"""Sessions that survive their replica: the orchestrator owns each request's token
record, so a session lost with its replica is rebuilt on another from that record.

Target: the record is the sequence the target's cache holds (prompt, then every
pending token and accepted proposal). When the replica fails mid-op (its stream
breaks, or its health polls stop), a session is opened on another replica with
that sequence as its prompt, and the op is sent again. Greedy output is the
same token for token; a seeded sampled request is too, since every op draws
from a random stream keyed by the request's seed and the position it starts at
(`core.sampling.position_seed`), so the op sent again draws what the first
attempt would have. The rebuilt cache holds the same tokens at the same
positions; its values were computed in one prefill rather than step by step,
which in floating point can differ in the last bits (as rows batched with other
sessions' can): the exactness matrix (`specserve.bench.exactness`) checks that
the output does not.

Draft: a token draft is restarted on another replica with the request's prompt,
and its next propose sends everything since; a feature draft gets the target's
hidden states of the whole sequence again (kept here, one row per token). With no
draft replica left, steps go on without proposals (plain decoding) until one
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from orchestrator.replicas import AdmissionQueue, ReplicaFailed, ReplicasFull, ReplicaSet, race_failure
from orchestrator.upstream import RemoteDraftProposer, RemoteTargetSession
from specserve.core.acceptance import Verdict
from specserve.core.errors import ResourceExhausted, Unavailable
from specserve.core.outcomes import OutcomeRequest, Speculation
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import Proposal
from specserve.serving import hidden_states
from specserve.serving.grpc_server import UpstreamError
from specserve.v1 import common_pb2

log = logging.getLogger(__name__)

# Statuses that mean "this replica, not this request": the session moves elsewhere.
MOVABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
# How long a request waits for some replica to be healthy before it fails UNAVAILABLE.
WAIT_FOR_REPLICA_S = 10.0


@dataclass(frozen=True)
class SessionPolicy:
    """Time limits of one request's upstream sessions."""

    # The client's deadline (event loop time), propagated to every stream; None: none.
    deadline: float | None = None
    # An op a replica has not answered in this long counts as that replica failing
    # (a wedged model thread still answers health polls).
    op_timeout_s: float = 60.0

    def stream_timeout_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - asyncio.get_running_loop().time())


def _movable(error: BaseException) -> bool:
    """The replica failed, not the request: the session should move."""
    return isinstance(error, ReplicaFailed) or (isinstance(error, UpstreamError) and error.code in MOVABLE)


class FailoverTargetSession:
    """The core loop's TargetSession over a set of target replicas."""

    def __init__(self, replicas: ReplicaSet, admission: AdmissionQueue | None = None, policy: SessionPolicy = SessionPolicy()):
        self.replicas = replicas
        self.admission = admission or AdmissionQueue()
        self.policy = policy
        self.session: RemoteTargetSession | None = None
        self.replica = None
        self.record: list[int] = []  # the tokens the target's cache holds
        self.failovers = 0
        self.closed = False  # the request is over: a session that opens now closes at once
        self._start_args: tuple[SamplingConfig, int, bool, object] | None = None

    @property
    def last_compute_ms(self) -> float:
        return self.session.last_compute_ms if self.session else 0.0

    @property
    def last_batch_tokens(self) -> int:
        return self.session.last_batch_tokens if self.session else 0

    @property
    def last_hidden_states(self):
        return self.session.last_hidden_states if self.session else None

    @property
    def last_candidates(self):
        """A Medusa session's next candidates (RemoteTargetSession.last_candidates)."""
        return self.session.last_candidates if self.session else None

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int, return_hidden_states: bool = False,
                    medusa=None) -> int:
        self._start_args = (sampling, seed, return_hidden_states, medusa)
        first = await self._open(prompt, first_open=True)
        self.record = list(prompt)
        return first

    async def verify(self, committed_len: int, tokens: list[int], draft_probs, parents: list[int] | None = None) -> Verdict:
        verdict = await self._call(lambda s: s.verify(committed_len, tokens, draft_probs, parents), committed_len)
        # The cache now holds the pending token and the accepted proposals (a chain's prefix or a tree's path).
        self.record = self.record[:committed_len] + [tokens[0], *verdict.tokens[:verdict.accepted]]
        return verdict

    async def lookahead(self, committed_len: int, pending: int, levels: list[list[int]],
                        candidates: list[list[int]]) -> tuple[Verdict, list[int]]:
        result = await self._call(lambda s: s.lookahead(committed_len, pending, levels, candidates), committed_len)
        verdict = result[0]
        # The cache now holds the pending token and the accepted candidate tokens.
        self.record = self.record[:committed_len] + [pending, *verdict.tokens[:verdict.accepted]]
        return result

    async def _call(self, op: Callable[[RemoteTargetSession], Awaitable], committed_len: int):
        while True:
            try:
                return await race_failure(asyncio.wait_for(op(self.session), self.policy.op_timeout_s), self.replica)
            except asyncio.TimeoutError:
                self._lost(f"no answer within {self.policy.op_timeout_s:.0f} s")
            except (UpstreamError, ReplicaFailed) as error:
                if not _movable(error):
                    raise
                self._lost(error)
            # Rebuild the session from the record of what the lost one held, then send the op again.
            self.failovers += 1
            await self._open(self.record[:committed_len], first_open=False)

    async def _open(self, prompt: list[int], first_open: bool) -> int:
        """A session on a healthy replica holding `prompt`; the token it generated after it."""
        sampling, seed, return_hidden, medusa = self._start_args
        tried: set[str] = set()
        while True:
            replica = await self._pick(tried)
            session = RemoteTargetSession(replica.stub, self.policy.stream_timeout_s())
            try:
                first = await race_failure(asyncio.wait_for(session.start(prompt, sampling, seed, return_hidden, medusa),
                                                            self.policy.op_timeout_s), replica)
            except BaseException as error:  # a cancelled request too: its half-open stream must not leak
                session.close()
                self.replicas.release(replica)
                if not (isinstance(error, asyncio.TimeoutError) or _movable(error)):
                    raise
                tried.add(replica.address)
                # Full (another request took the last slot) or refused before the start op went out:
                # the replica is alive, so wait like for any full replica; else it failed.
                alive = isinstance(error, UpstreamError) and (error.code == grpc.StatusCode.RESOURCE_EXHAUSTED or error.unsent)
                if not alive:
                    self.replicas.mark_failed(replica, str(error) or "no answer")
                continue
            if self.closed:  # the request ended while this session opened
                session.close()
                self.replicas.release(replica)
                raise asyncio.CancelledError()
            self.session, self.replica = session, replica
            if not first_open:
                log.info("target session moved to %s with %d tokens", replica.address, len(prompt))
            return first

    async def _pick(self, tried: set[str]):
        """A healthy replica with room, not tried yet. Waits up to WAIT_FOR_REPLICA_S for a
        healthy replica, and in the admission queue while every replica is full."""
        loop = asyncio.get_running_loop()
        unhealthy_until = loop.time() + WAIT_FOR_REPLICA_S
        async with contextlib.AsyncExitStack() as queue:
            queued_until = None
            while True:
                try:
                    return self.replicas.pick(exclude=frozenset(tried))
                except ReplicasFull:
                    if queued_until is None:
                        queued_until = await queue.enter_async_context(self.admission.place())
                    elif loop.time() >= queued_until:
                        raise ResourceExhausted(
                            f"every target replica is at its session limit and stayed so for {self.admission.wait_s:.0f} s; "
                            "retry in a few seconds", retry_after_ms=2000) from None
                except Unavailable:
                    if loop.time() >= unhealthy_until:
                        raise
                if tried and not [r for r in self.replicas.healthy() if r.address not in tried]:
                    tried.clear()  # every replica was tried: one may take the session now
                await asyncio.sleep(0.05)

    def _lost(self, error: Exception | str) -> None:
        log.warning("target replica %s lost mid-request (%s); moving the session", self.replica.address, error)
        self.replicas.mark_failed(self.replica, str(error))
        self.close()
        self.closed = False  # only this replica's session ended; the request goes on

    def close(self) -> None:
        self.closed = True
        if self.session is not None:
            self.session.close()
            self.replicas.release(self.replica)
            self.session = None


class FailoverDraftProposer:
    """A remote draft (token or feature draft) over a set of draft replicas.

    `make` builds the remote proposer for one replica's stub. Never fails a request
    for a draft's sake: without a draft replica it proposes nothing (plain steps) and
    tries again at most every `retry_every_s`."""

    def __init__(self, replicas: ReplicaSet, make: Callable[[object, float | None], RemoteDraftProposer],
                 needs_target_hidden_states: bool, policy: SessionPolicy = SessionPolicy(), retry_every_s: float = 1.0):
        self.replicas = replicas
        self.policy = policy
        self.make = make
        self.retry_every_s = retry_every_s
        self.inner: RemoteDraftProposer | None = None
        self.replica = None
        self.needs_target_hidden_states = needs_target_hidden_states
        self.history: list[common_pb2.HiddenStates] = []  # every row the target sent, for a new replica
        self.failovers = 0
        self._forward_passes_before = 0  # of replicas lost
        self._start_args: tuple[list[int], SamplingConfig, int] | None = None
        self._next_try = 0.0
        self.last_compute_ms = 0.0
        self.closed = False  # the request is over: a session that opens now closes at once

    @property
    def forward_passes(self) -> int:
        return self._forward_passes_before + (self.inner.forward_passes if self.inner else 0)

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        self._start_args = (list(prompt), sampling, seed)
        await self._open()

    def observe_target_hidden_states(self, hidden) -> None:
        self.history.append(hidden)
        if self.inner is not None:
            self.inner.observe_target_hidden_states(hidden)

    @property
    def drafts_trees(self) -> bool:
        """The replica's session drafts trees (and takes a node budget per step)."""
        return bool(getattr(self.inner, "drafts_trees", False))

    async def propose(self, sequence: list[int], k: int, nodes: int | None = None) -> Proposal:
        # A replica lost mid-op: the same proposal is asked of another at once, so the step
        # proposes what it would have (a seeded sampled request then draws as without the fault).
        for _ in range(2):
            if self.inner is None and not await self._reopen():
                return Proposal([])
            proposing = self.inner.propose(sequence, k) if nodes is None else self.inner.propose(sequence, k, nodes=nodes)
            proposal = await self._op(proposing, None)
            if proposal is not None:
                return proposal
        return Proposal([])

    async def speculate(self, sequence: list[int], proposal: Proposal, outcomes: list[OutcomeRequest], k: int) -> Speculation:
        """Drafting ahead (RemoteDraftProposer.speculate); with no draft replica, or when the replica
        fails meanwhile, no outcomes (the next proposal is then drafted afresh, by another replica)."""
        if self.inner is None and not await self._reopen():
            return Speculation([], 0.0)
        return await self._op(self.inner.speculate(sequence, proposal, outcomes, k), Speculation([], 0.0))

    async def _reopen(self) -> bool:
        """A session on some replica again, at most every retry_every_s."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_try or not await self._open():
            return False
        self.failovers += 1
        return True

    async def _op(self, op, without):
        """op on the replica's session; `without` when the replica fails (the session is dropped)."""
        try:
            result = await race_failure(asyncio.wait_for(op, self.policy.op_timeout_s), self.replica)
        except (UpstreamError, ReplicaFailed, asyncio.TimeoutError) as error:
            if not (isinstance(error, asyncio.TimeoutError) or _movable(error)):
                raise
            log.warning("draft replica %s lost mid-request (%s); plain steps until another takes over", self.replica.address, error)
            self.replicas.mark_failed(self.replica, str(error))
            self._drop()
            return without
        self.last_compute_ms = self.inner.last_compute_ms
        return result

    async def _open(self) -> bool:
        """A session on some healthy draft replica, caught up with the request; False if none."""
        prompt, sampling, seed = self._start_args
        tried: set[str] = set()
        while True:
            try:
                replica = self.replicas.pick(exclude=frozenset(tried))
            except (Unavailable, ReplicasFull):
                # No draft (or every draft replica full): plain steps now, another try later.
                self._next_try = asyncio.get_running_loop().time() + self.retry_every_s
                return False
            inner = self.make(replica.stub, self.policy.stream_timeout_s())
            try:
                await race_failure(asyncio.wait_for(inner.start(prompt, sampling, seed), self.policy.op_timeout_s), replica)
            except BaseException as error:  # a cancelled request too: its half-open stream must not leak
                inner.close()
                self.replicas.release(replica)
                if not (isinstance(error, asyncio.TimeoutError) or _movable(error)):
                    raise
                tried.add(replica.address)
                continue
            if self.closed:  # the request ended while this session opened (e.g. its target start failed)
                inner.close()
                self.replicas.release(replica)
                return False
            if self.needs_target_hidden_states and self.history:
                inner.observe_target_hidden_states(hidden_states.concat(self.history))
            self.inner, self.replica = inner, replica
            return True

    def _drop(self) -> None:
        self.close()
        self.closed = False  # only this replica's session ended; the request goes on
        self._next_try = 0.0

    def close(self) -> None:
        self.closed = True
        if self.inner is not None:
            self._forward_passes_before += self.inner.forward_passes
            self.inner.close()
            self.replicas.release(self.replica)
            self.inner = None
