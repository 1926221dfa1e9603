"""What serves a request in the orchestrator: sessions on the upstream replicas (with
failover), described for the request planner (specserve.generation.plan.Serving), and
their closing once the request ends, however it ends."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.costs import costs_of
from orchestrator.failover import FailoverDraftProposer, FailoverTargetSession, SessionPolicy
from orchestrator.replicas import AdmissionQueue, ReplicaSet
from orchestrator.upstream import RemoteDraftProposer, RemoteFeatureDraftProposer
from specserve.core.errors import Unavailable
from specserve.core.ngram_pool import NgramPool
from specserve.core.tree import TreeShape
from specserve.generation.plan import Plan, Serving
from specserve.v1 import model_service_pb2


@dataclass
class Upstreams:
    """The replicas of the target service and of the draft service (None: no draft)."""

    target: ReplicaSet
    draft: ReplicaSet | None
    # One op's round trip to each service, measured at start-up, for speculation control.
    target_round_trip_ms: float = 0.0
    draft_round_trip_ms: float = 0.0

    @property
    def target_info(self) -> model_service_pb2.ModelInfo | None:  # None until a target replica answers
        return self.target.info()

    @property
    def draft_info(self) -> model_service_pb2.ModelInfo | None:  # None until a draft replica answers
        return self.draft.info() if self.draft is not None else None


def serving(upstreams: Upstreams, target_info: model_service_pb2.ModelInfo, admission: AdmissionQueue,
            policy: SessionPolicy, pool: NgramPool | None) -> Serving:
    """One request's sessions on these replicas, and what their last GetInfo says of the models."""
    draft_info = upstreams.draft_info

    def open_draft(tree: TreeShape | None) -> FailoverDraftProposer:
        if draft_info is None:
            raise Unavailable("the draft service has not answered yet; retry shortly")
        if draft_info.needs_target_hidden_states:
            return FailoverDraftProposer(
                upstreams.draft, lambda stub, timeout_s: RemoteFeatureDraftProposer(stub, tree, timeout_s),
                needs_target_hidden_states=True, policy=policy)
        return FailoverDraftProposer(upstreams.draft, RemoteDraftProposer, needs_target_hidden_states=False, policy=policy)

    return Serving(
        open_target=lambda: FailoverTargetSession(upstreams.target, admission, policy),
        open_draft=open_draft,
        eos_token_ids=frozenset(target_info.eos_token_ids),
        max_context_tokens=target_info.max_context_tokens,
        target_costs=costs_of(target_info),
        draft_costs=costs_of(draft_info),
        target_round_trip_ms=upstreams.target_round_trip_ms,
        draft_round_trip_ms=upstreams.draft_round_trip_ms,
        draft_needs_target_hidden_states=draft_info is not None and draft_info.needs_target_hidden_states,
        draft_batches=draft_info is not None and draft_info.batch_token_budget > 0,
        shared_cores=shared_cores(target_info, draft_info),
        pool=pool,
    )


def shared_cores(target: model_service_pb2.ModelInfo, draft: model_service_pb2.ModelInfo | None) -> bool:
    """Target and draft both compute on the CPU, of one model: taken to share its cores, where
    drafting ahead buys little (asynchronous drafting's auto stays synchronous)."""
    if draft is None:
        return False
    return target.device == draft.device == "cpu" and target.cost_profile.cpu == draft.cost_profile.cpu != ""


async def close(run: Plan) -> None:
    """End the loop (ops still in flight end with their sessions, unused) and close the sessions."""
    await run.steps.aclose()
    run.target.close()
    # A remote draft holds a session (a wrapper forwards close to it); prompt lookup holds none.
    close_draft = getattr(run.proposer, "close", None)
    if close_draft is not None:
        close_draft()
