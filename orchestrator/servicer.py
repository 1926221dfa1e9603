"""Orchestrator.Generate: validate the request, plan its decoding, stream the responses."""

from __future__ import annotations

import asyncio
import time

import grpc

from orchestrator import sessions
from orchestrator.failover import SessionPolicy
from orchestrator.replicas import AdmissionQueue
from orchestrator.responses import ResponseStream
from orchestrator.sessions import Upstreams
from specserve.core.errors import Unavailable
from specserve.core.ngram_pool import NgramPool, record_sequence
from specserve.generation import requests
from specserve.generation.plan import Serving, plan
from specserve.serving.grpc_server import status_on_error
from specserve.v1 import model_service_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc


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
            run = plan(job, self.limits, self._serving(info, context), step_timings=request.include_step_timings)
            responses = ResponseStream(self.tokenizer, job, run, began)
            try:
                async for chunk in run.steps:
                    response = responses.push(chunk)
                    if response is not None:
                        yield response
                    if responses.finished:
                        break
            finally:
                await sessions.close(run)
                if self.pool is not None and responses.generated:
                    record_sequence(self.pool, job.prompt_ids + responses.generated)  # never blocks

    def _serving(self, info: model_service_pb2.ModelInfo, context: grpc.aio.ServicerContext) -> Serving:
        remaining_s = context.time_remaining()  # the client's deadline, propagated to every upstream stream
        deadline = None if remaining_s is None else asyncio.get_running_loop().time() + remaining_s
        policy = SessionPolicy(deadline, self.op_timeout_s)
        return sessions.serving(self.upstreams, info, self.admission, policy, self.pool)
