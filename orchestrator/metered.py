"""The orchestrator's Prometheus metrics, read off the responses it streams.

A subclass rather than edits through Generate: everything a metric needs is in the
public responses (tokens per message, accepted proposals per message, the final
stats), so the decoding path stays as it is.
"""

from __future__ import annotations

import grpc

from orchestrator.servicer import OrchestratorServicer
from specserve.serving.metrics import OrchestratorMetrics, RequestMetrics
from specserve.v1 import orchestrator_pb2 as pb

_METHOD_NAMES = {value: name.lower() for name, value in pb.Method.items()}


class MeteredOrchestratorServicer(OrchestratorServicer):
    def __init__(self, *args, metrics: OrchestratorMetrics, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        method = _METHOD_NAMES.get(request.speculation.method or self.limits.default_method, "unknown")
        with self.metrics.request(method) as tracker:
            try:
                async for response in super().Generate(request, context):
                    _observe(tracker, response)
                    yield response
            except grpc.aio.AbortError:
                # The request failed with a status (set by the abort): count it by its code.
                details = context.details() or ""
                if details.startswith(("target service", "draft service")):
                    self.metrics.upstream_errors.labels(details.split(" ", 1)[0], context.code().name.lower()).inc()
                tracker.outcome = context.code().name.lower()
                raise


def _observe(tracker: RequestMetrics, response: pb.GenerateResponse) -> None:
    if response.HasField("stats"):
        tracker.method = _METHOD_NAMES.get(response.stats.method, tracker.method)
    tracker.chunk(len(response.token_ids))
    if response.HasField("stats"):
        stats = response.stats
        tracker.finish(stats.proposed_tokens, stats.accepted_tokens, stats.target_forward_passes, stats.failovers)
