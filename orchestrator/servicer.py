"""Orchestrator.Generate: validate, open sessions, run the core loop, stream text."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import grpc

from orchestrator.costs import costs_of
from orchestrator.failover import FailoverDraftProposer, FailoverTargetSession, SessionPolicy
from orchestrator.replicas import AdmissionQueue, ReplicaSet
from orchestrator.upstream import RemoteDraftProposer, RemoteFeatureDraftProposer
from specserve.core.async_decode import AheadStats, decode_ahead
from specserve.core.async_plan import AheadPlanner
from specserve.core.controller import speculation_policy
from specserve.core.errors import Unavailable
from specserve.core.lookahead_decode import decode_lookahead
from specserve.core.medusa_proposer import ColocatedMedusaProposer
from specserve.core.ngram_pool import LOOKUP_KEY, NgramPool, lookup_fallback, record_sequence
from specserve.core.proposers import PromptLookupProposer, WithLookupBranch
from specserve.core.speculate import DecodeRequest, Finish, decode
from specserve.core.text import IncrementalDetokenizer, StopStringFilter
from specserve.generation import requests
from specserve.serving.grpc_server import status_on_error
from specserve.v1 import common_pb2, model_service_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

FINISH = {Finish.LENGTH: pb.LENGTH, Finish.STOP: pb.STOP, Finish.EOS: pb.EOS}


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


def serving_model(replica) -> common_pb2.ServingModel | None:
    """What a replica runs (from its last GetInfo), for a response's stats; None without one."""
    info = replica.info if replica is not None else None
    if info is None:
        return None
    return common_pb2.ServingModel(model=info.model, engine=info.engine, dtype=info.dtype, quantization=info.quantization)


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, upstreams: Upstreams, tokenizer, limits: requests.Limits, pool: NgramPool | None,
                 admission: AdmissionQueue | None = None, op_timeout_s: float = 60.0):
        self.upstreams = upstreams
        self.tokenizer = tokenizer
        self.limits = limits
        self.pool = pool
        self.admission = admission or AdmissionQueue()  # requests waiting for a target session
        self.op_timeout_s = op_timeout_s

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        began = time.perf_counter()
        async with status_on_error(context):
            info = self.upstreams.target_info
            if info is None:
                raise Unavailable("the target service has not answered yet; retry shortly")
            job = requests.parse(request, self.tokenizer, self.limits, info.max_context_tokens, self.upstreams.draft is not None,
                                 medusa_heads=info.medusa_num_heads)
            remaining_s = context.time_remaining()  # the client's deadline, propagated to every upstream stream
            loop = asyncio.get_running_loop()
            policy = SessionPolicy(None if remaining_s is None else loop.time() + remaining_s, self.op_timeout_s)
            target = FailoverTargetSession(self.upstreams.target, self.admission, policy)
            proposer = self._proposer(job, policy)
            speculation = self._speculation(job) if job.k else None
            decoding = DecodeRequest(
                prompt=job.prompt_ids,
                sampling=job.sampling,
                seed=job.seed if job.seed is not None else secrets.randbits(62),
                eos_token_ids=frozenset(info.eos_token_ids),
                max_context_tokens=info.max_context_tokens,
                speculation=speculation,
            )
            if request.include_step_timings:
                decoding.stats.steps = []
            detokenizer = IncrementalDetokenizer(self.tokenizer, job.prompt_ids)
            stops = StopStringFilter(job.sampling.stop)
            generated: list[int] = []
            first_token_ms = None
            # The pool changes with other traffic, and different proposals consume the random
            # stream differently: a seeded sampling request skips it so that it stays
            # reproducible. Greedy output never depends on the proposals.
            pool = self.pool if job.sampling.greedy or job.seed is None else None
            if pool is not None and hasattr(pool, "prefetch"):
                pool.prefetch([tuple(job.prompt_ids[-LOOKUP_KEY:]), (job.prompt_ids[-1],)])
            synchronous_reason = self._synchronous_reason(job, proposer)
            ahead = None  # drafting ahead (asynchronous drafting): its stats
            if job.method == pb.LOOKAHEAD:
                costs = costs_of(self.upstreams.target_info) if self.limits.speculation_control == "cost" else None
                steps = decode_lookahead(target, decoding, job.lookahead, pool, costs.verify_chain if costs else None)
            elif job.method == pb.DRAFT_MODEL and job.async_draft != "off" and not synchronous_reason:
                ahead = AheadStats()
                steps = decode_ahead(target, proposer, decoding, self._ahead_planner(job), ahead, self._outcome_budget())
            else:
                steps = decode(target, proposer, decoding)
            accepted_so_far = proposed_so_far = 0
            try:
                async for chunk in steps:
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - began) * 1e3
                    generated.extend(chunk.tokens)
                    # A verification's accepted proposals come first in its chunk; their text is
                    # detokenized apart so that clients can tell them from the target's own token.
                    accepted = min(decoding.stats.accepted_tokens - accepted_so_far, len(chunk.tokens))
                    accepted_so_far = decoding.stats.accepted_tokens
                    accepted_text = stops.push(detokenizer.push(chunk.tokens[:accepted])) if accepted else ""
                    text = accepted_text + stops.push(detokenizer.push(chunk.tokens[accepted:]))
                    marks = dict(accepted_tokens=accepted, accepted_text_length=len(accepted_text),
                                 proposed_tokens=decoding.stats.proposed_tokens - proposed_so_far)
                    proposed_so_far = decoding.stats.proposed_tokens
                    finish = Finish.STOP if stops.stopped else chunk.finish
                    if finish is None:
                        if chunk.tokens:
                            yield pb.GenerateResponse(token_ids=chunk.tokens, text=text, **marks)
                        continue
                    text += stops.push(detokenizer.flush()) + stops.flush()
                    stats = decoding.stats
                    yield pb.GenerateResponse(
                        token_ids=chunk.tokens,
                        text=text,
                        **marks,
                        finish_reason=FINISH[finish],
                        stats=pb.GenerationStats(
                            prompt_tokens=len(job.prompt_ids),
                            generated_tokens=len(generated),
                            target_forward_passes=stats.target_forward_passes,
                            proposed_tokens=stats.proposed_tokens,
                            accepted_tokens=stats.accepted_tokens,
                            wall_time_ms=(time.perf_counter() - began) * 1e3,
                            mean_accepted_length=stats.mean_accepted_length,
                            time_to_first_token_ms=first_token_ms or 0.0,
                            method=job.method,
                            draft_forward_passes=proposer.forward_passes if proposer else 0,
                            lossy=job.lossy,
                            target=serving_model(target.replica),
                            draft=serving_model(getattr(proposer, "replica", None)),
                            failovers=target.failovers + getattr(proposer, "failovers", 0),
                            async_draft=ahead is not None and ahead.pipelined_steps > 0,
                            synchronous_reason=synchronous_reason or (
                                "auto: no step was expected to be faster drafting ahead"
                                if ahead is not None and not ahead.pipelined_steps and job.async_draft == "auto" else ""),
                            **(_ahead_fields(ahead) if ahead is not None else {}),
                            step_timings=[
                                pb.StepTiming(wall_ms=s.wall_ms, compute_ms=s.compute_ms, proposed=s.proposed, accepted=s.accepted)
                                for s in stats.steps or []
                            ],
                        ),
                    )
                    break
            finally:
                await steps.aclose()  # ops still in flight end with their sessions, unused
                target.close()
                # A remote draft holds a session (a wrapper forwards close to it); prompt lookup holds none.
                close_draft = getattr(proposer, "close", None)
                if close_draft is not None:
                    close_draft()
                if self.pool is not None and generated:
                    record_sequence(self.pool, job.prompt_ids + generated)  # never blocks

    def _speculation(self, job: requests.Job):
        up = self.upstreams
        remote_draft = job.method == pb.DRAFT_MODEL
        trees = remote_draft and job.sampling.greedy and up.draft_info.needs_target_hidden_states and job.tree_nodes > 0
        return speculation_policy(
            costs_of(up.target_info) if self.limits.speculation_control == "cost" else None,
            costs_of(up.draft_info) if remote_draft else None, k=job.k, k_max=self.limits.max_speculative_tokens,
            fixed=job.fixed_length, tree_nodes=job.tree_nodes if trees else 0, tree_width=self.limits.tree_width,
            step_overhead_ms=up.target_round_trip_ms, draft_overhead_ms=up.draft_round_trip_ms if remote_draft else 0.0)

    def _synchronous_reason(self, job: requests.Job, proposer) -> str:
        """Why a request that asked for asynchronous drafting drafts synchronously ('' when it does not,
        or did not ask: the server's default reaches DRAFT_MODEL requests only)."""
        if job.async_draft == "off" or (job.method != pb.DRAFT_MODEL and not job.async_draft_asked):
            return ""
        if job.method != pb.DRAFT_MODEL:
            return "asynchronous drafting applies to DRAFT_MODEL only"
        if not job.sampling.greedy:
            return "sampled requests draft synchronously: drafting ahead is built for greedy requests only"
        if getattr(proposer, "needs_target_hidden_states", False) or not hasattr(proposer, "speculate"):
            return ("the draft service hosts a feature draft, which drafts from the target's hidden states of "
                    "verified tokens and so cannot draft ahead of a verdict")
        if job.async_draft == "auto" and self._shared_cores():
            return ("auto: target and draft compute on one CPU (taken to share its cores), where drafting ahead "
                    "buys little; ASYNC_DRAFT_ON drafts ahead anyway")
        return ""

    def _shared_cores(self) -> bool:
        """Target and draft both compute on the CPU, of one model: taken to share its cores, where
        drafting ahead buys little (asynchronous drafting's auto stays synchronous)."""
        target, draft = self.upstreams.target_info, self.upstreams.draft_info
        return target.device == draft.device == "cpu" and target.cost_profile.cpu == draft.cost_profile.cpu != ""

    def _ahead_planner(self, job: requests.Job) -> AheadPlanner:
        up = self.upstreams
        return AheadPlanner(job.async_draft, job.k, self.limits.max_speculative_tokens, costs_of(up.target_info),
                            costs_of(up.draft_info), up.target_round_trip_ms, up.draft_round_trip_ms, fixed=job.fixed_length,
                            shared_cores=self._shared_cores())

    def _outcome_budget(self) -> int:
        """Outcomes drafted ahead per step: the server's limit when the draft batches them into shared
        forward passes (a pass then costs about one row's time on a GPU-like engine), else one."""
        info = self.upstreams.draft_info
        return self.limits.async_outcomes if info is not None and info.batch_token_budget > 0 else 1

    def _proposer(self, job: requests.Job, policy: SessionPolicy):
        if job.method == pb.MEDUSA:
            return ColocatedMedusaProposer(job.medusa)  # the target's own heads: no draft session
        if job.method == pb.DRAFT_MODEL:
            info = self.upstreams.draft_info
            if info is None:
                raise Unavailable("the draft service has not answered yet; retry shortly")
            # A feature draft drafts from the target's hidden states, which the loop then asks for,
            # and trees for greedy requests (unless the request's tree_nodes is 0), to which
            # prompt lookup adds its continuation as one more branch.
            if info.needs_target_hidden_states:
                shape = self.limits.tree_shape(job.tree_nodes)
                feature_draft = FailoverDraftProposer(
                    self.upstreams.draft, lambda stub, timeout_s: RemoteFeatureDraftProposer(stub, shape, timeout_s),
                    needs_target_hidden_states=True, policy=policy)
                return WithLookupBranch(feature_draft)
            return FailoverDraftProposer(self.upstreams.draft, RemoteDraftProposer, needs_target_hidden_states=False, policy=policy)
        if job.method == pb.PROMPT_LOOKUP:
            use_pool = self.pool is not None and (job.sampling.greedy or job.seed is None)  # see Generate
            return PromptLookupProposer(fallback=lookup_fallback(self.pool) if use_pool else None)
        return None


def _ahead_fields(ahead: AheadStats) -> dict:
    """GenerationStats fields of drafting ahead."""
    return dict(pipelined_steps=ahead.pipelined_steps, outcomes_drafted=ahead.outcomes_drafted,
                outcome_hits=ahead.outcome_hits, stale_outcomes=ahead.stale_outcomes,
                draft_compute_ms=ahead.draft_compute_ms, draft_exposed_ms=ahead.draft_exposed_ms)
