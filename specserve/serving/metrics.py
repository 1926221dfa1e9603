"""Prometheus metrics of the services: one CollectorRegistry per server, never the global one.

Each server builds its own registry (so two servers in one process never share or
clash over metrics) and exposes it on its own port (`--metrics-port`; the gateway
serves it at /metrics). Names follow Prometheus conventions: a `specserve_<service>_`
prefix, base units (seconds), `_total` on counters, labels for method/outcome/op.

The mean accepted length (tau) is `accepted_length`'s sum / count: one observation
per target decoding forward pass, of the tokens that pass produced.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from specserve.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, Unimplemented

# Seconds; CPU inference spans ~1 ms (a tiny model) to tens of seconds (a long prompt).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# Tokens per target forward pass: 1 (nothing accepted) up to K + 1.
ACCEPTED_LENGTH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 33)

_OUTCOMES = {
    InvalidArgument: "invalid_argument",
    FailedPrecondition: "failed_precondition",
    ResourceExhausted: "resource_exhausted",
    Unavailable: "unavailable",
    Unimplemented: "unimplemented",
}


def outcome_of(error: BaseException | None) -> str:
    """A short label for how a request or session ended: ok, cancelled, or a status code's name."""
    if error is None:
        return "ok"
    for kind, label in _OUTCOMES.items():
        if isinstance(error, kind):
            return label
    code = getattr(error, "code", None)  # UpstreamError, grpc.aio.AioRpcError
    if callable(code):
        code = code()
    if isinstance(code, grpc.StatusCode):
        return code.name.lower()
    if isinstance(error, (GeneratorExit, KeyboardInterrupt)) or type(error).__name__ in ("CancelledError", "AbortError"):
        return "cancelled"
    return "internal"


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Serves the registry over HTTP on host:port in a daemon thread; returns the server (call shutdown())."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


class OrchestratorMetrics:
    """Per request: outcome, latencies, tokens generated / proposed / accepted by method."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        p, r = "specserve_orchestrator_", self.registry
        self.requests = Counter(p + "requests", "Generate requests by method and outcome", ["method", "outcome"], registry=r)
        self.active = Gauge(p + "active_requests", "Generate requests in progress", registry=r)
        self.queued = Gauge(p + "queued_requests", "Requests waiting for a target session (the admission queue)", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from the request to its first generated token",
                              ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram(p + "time_per_output_token_seconds",
                                   "Time per generated token after the first (a step's time over the tokens it produced)",
                                   ["method"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.generated = Counter(p + "generated_tokens", "Tokens generated (EOS excluded)", ["method"], registry=r)
        self.proposed = Counter(p + "proposed_tokens", "Proposed tokens sent to the target for verification", ["method"], registry=r)
        self.accepted = Counter(p + "accepted_tokens", "Proposed tokens the target accepted", ["method"], registry=r)
        self.accepted_length = Histogram(p + "accepted_length",
                                         "Tokens produced per target decoding forward pass; sum/count is the mean accepted length (tau)",
                                         ["method"], buckets=ACCEPTED_LENGTH_BUCKETS, registry=r)
        self.target_forward = Counter(p + "target_forward_passes", "Forward passes of the target, prefill included", ["method"], registry=r)
        self.failovers = Counter(p + "failovers", "Sessions moved to another replica mid-request (target and draft)",
                                 ["method"], registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Failed calls to the target or draft services by status code",
                                       ["service", "code"], registry=r)
        self.pool_lookups = Counter(p + "ngram_pool_lookups", "Lookups in the shared n-gram pool by result (hit: a continuation came back)",
                                    ["result"], registry=r)

    @contextlib.contextmanager
    def request(self, method: str) -> Iterator["RequestMetrics"]:
        """Counts one request; its outcome comes from how the block ends."""
        self.active.inc()
        tracker = RequestMetrics(self, method)
        try:
            yield tracker
        except BaseException as error:
            self.requests.labels(tracker.method, tracker.outcome or outcome_of(error)).inc()
            raise
        else:
            self.requests.labels(tracker.method, "ok").inc()
        finally:
            self.active.dec()

    def pool_lookup(self, hit: bool) -> None:
        """Counts one lookup in the shared n-gram pool (NgramPool's on_lookup)."""
        self.pool_lookups.labels("hit" if hit else "miss").inc()


class RequestMetrics:
    """What one request feeds to OrchestratorMetrics as its chunks arrive."""

    def __init__(self, metrics: OrchestratorMetrics, method: str):
        self.metrics = metrics
        self.method = method  # relabelled once the request's method is resolved
        self.began = time.perf_counter()
        self.last = None  # when the previous chunk arrived
        self.outcome: str | None = None  # set when the request failed with a known status

    def chunk(self, tokens: int) -> None:
        now = time.perf_counter()
        m, method = self.metrics, self.method
        if self.last is None:
            m.ttft.labels(method).observe(now - self.began)
        elif tokens:
            m.accepted_length.labels(method).observe(tokens)
            per_token = (now - self.last) / tokens
            for _ in range(tokens):
                m.per_token.labels(method).observe(per_token)
        m.generated.labels(method).inc(tokens)
        self.last = now

    def finish(self, proposed: int, accepted: int, target_forward_passes: int, failovers: int = 0) -> None:
        m, method = self.metrics, self.method
        m.failovers.labels(method).inc(failovers)
        m.proposed.labels(method).inc(proposed)
        m.accepted.labels(method).inc(accepted)
        m.target_forward.labels(method).inc(target_forward_passes)


class ModelServiceMetrics:
    """A target or draft service: sessions by outcome, op times, active sessions, queued ops."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        p, r = f"specserve_{role}_", self.registry
        self.sessions = Counter(p + "sessions", "Session streams by outcome", ["outcome"], registry=r)
        self.active = Gauge(p + "active_sessions", "Session streams holding a KV cache now", registry=r)
        self.queued = Gauge(p + "queued_ops", "Work waiting for the model thread (ops between forward passes, calls not begun)", registry=r)
        self.ops = Histogram(p + "step_duration_seconds", "Time to serve one op (model compute and queueing) by op",
                             ["op"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(p + "op_tokens", "Tokens the ops carried in (prompt, appended or verified tokens) by op",
                              ["op"], registry=r)
        self.pass_sessions = Histogram(p + "batch_sessions", "Sessions whose rows shared one forward pass",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.pass_tokens = Histogram(p + "batch_tokens", "Tokens in one forward pass (all sessions)",
                                     buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)

    def observe_pass(self, record) -> None:
        """One forward pass of the model thread (a runtime.scheduler.PassRecord)."""
        self.pass_sessions.observe(record.sessions)
        self.pass_tokens.observe(record.tokens)

    def observe_op(self, request, seconds: float) -> None:
        """One op of a Session stream (a TargetRequest or DraftRequest) and the time it took."""
        op = request.WhichOneof("op") or "none"
        body = getattr(request, op, None)
        if op == "verify" and body.parents:
            op = "verify_tree"
        elif op == "propose" and body.HasField("tree"):
            op = "propose_tree"
        self.ops.labels(op).observe(seconds)
        tokens = getattr(body, "prompt_token_ids", None) or getattr(body, "token_ids", None) or []
        self.tokens.labels(op).inc(len(tokens))

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        self.active.inc()
        try:
            yield
        except BaseException as error:
            # The orchestrator ends every session by cancelling its stream: that is a normal close.
            outcome = outcome_of(error)
            self.sessions.labels("ok" if outcome == "cancelled" else outcome).inc()
            raise
        else:
            self.sessions.labels("ok").inc()
        finally:
            self.active.dec()


class GatewayMetrics:
    """The HTTP gateway: requests by route and status, latencies, tokens by method."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        p, r = "specserve_gateway_", self.registry
        self.requests = Counter(p + "http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.active = Gauge(p + "active_requests", "Completion requests in progress", registry=r)
        self.duration = Histogram(p + "request_duration_seconds", "Time to serve a completion request, to its last byte",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from the HTTP request to its first generated token",
                              ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter(p + "generated_tokens", "Tokens generated", ["method"], registry=r)
        self.proposed = Counter(p + "proposed_tokens", "Proposed tokens sent to the target for verification", ["method"], registry=r)
        self.accepted = Counter(p + "accepted_tokens", "Proposed tokens the target accepted", ["method"], registry=r)
