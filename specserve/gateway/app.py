"""The OpenAI-compatible HTTP gateway: an ASGI app in front of the orchestrator's gRPC API.

Each completion request becomes one Orchestrator.Generate call. The first streamed
message is awaited before the HTTP response starts, so every error the orchestrator
finds in a request (they all come before its first token) gets its own HTTP status;
an error after that arrives as a final SSE event. A client that goes away cancels
the call, which frees the request's sessions.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from specserve.gateway import translation as tr
from specserve.serving.grpc_server import CHANNEL_OPTIONS
from specserve.serving.metrics import GatewayMetrics
from specserve.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class Gateway:
    """The app's state: one channel to the orchestrator, the served model's name, metrics."""

    def __init__(self, orchestrator: str, model_name: str, api_key: str | None, metrics: GatewayMetrics):
        self.orchestrator = orchestrator
        self.model_name = model_name
        self.api_key = api_key or None
        self.metrics = metrics
        self.created = int(time.time())
        self.channel: grpc.aio.Channel | None = None
        self.stub: orchestrator_pb2_grpc.OrchestratorStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise tr.GatewayError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def complete(self, request: Request, chat: bool) -> Response:
        began = time.perf_counter()
        route = "/v1/chat/completions" if chat else "/v1/completions"
        self.check_key(request)
        try:
            raw = await request.json()
        except ValueError:
            raise tr.GatewayError(400, "the request body is not valid JSON") from None
        body = tr.parse_body(tr.ChatCompletionBody if chat else tr.CompletionBody, raw)
        if body.model != self.model_name:
            raise tr.GatewayError(404, f"model: {body.model!r} is not served here; GET /v1/models lists {self.model_name!r}",
                                  param="model", code="model_not_found")
        # The client's key travels on to the orchestrator: one started with --auth-token-file checks it.
        authorization = request.headers.get("authorization")
        call = self.stub.Generate(tr.to_generate_request(body), metadata=[("authorization", authorization)] if authorization else None)
        self.metrics.active.inc()
        try:
            first = await _read(call)
        except BaseException:
            self.metrics.active.dec()
            call.cancel()
            raise
        method = tr.METHOD_NAMES.get(first.stats.method) if first.HasField("stats") else None
        self.metrics.ttft.labels(method or _requested_method(body)).observe(time.perf_counter() - began)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(call, first, chat, ident, include_usage, route, began, _requested_method(body))
            self.metrics.requests.labels(route, "200").inc()
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            text, last = first.text, first
            while not last.finish_reason:
                last = await _read(call)
                text += last.text
            await _end(call)
        finally:
            self.metrics.active.dec()
            call.cancel()
        self._finished(last.stats, route, began)
        self.metrics.requests.labels(route, "200").inc()
        render = tr.chat_completion if chat else tr.text_completion
        return JSONResponse(render(ident, int(time.time()), self.model_name, text, last))

    async def _stream(self, call, first: pb.GenerateResponse, chat: bool, ident: str, include_usage: bool,
                      route: str, began: float, method: str) -> AsyncIterator[bytes]:
        created, model = int(time.time()), self.model_name
        try:
            if chat:
                yield _sse(tr.chunk(chat, ident, created, model, None, None, role=True))
            response = first
            while True:
                yield _sse(tr.chunk(chat, ident, created, model, response.text, response))
                if response.finish_reason:
                    await _end(call)
                    break
                response = await _read(call)
            if include_usage:
                yield _sse(tr.usage_chunk(chat, ident, created, model, response.stats))
            self._finished(response.stats, route, began)
        except tr.GatewayError as error:  # after the 200 went out: the error is the last event
            yield _sse(error.body())
        finally:
            self.metrics.active.dec()
            call.cancel()  # a client that went away ends generation here
        yield b"data: [DONE]\n\n"

    def _finished(self, stats: pb.GenerationStats, route: str, began: float) -> None:
        m, method = self.metrics, tr.METHOD_NAMES.get(stats.method, "unknown")
        m.generated.labels(method).inc(stats.generated_tokens)
        m.proposed.labels(method).inc(stats.proposed_tokens)
        m.accepted.labels(method).inc(stats.accepted_tokens)
        m.duration.labels(route).observe(time.perf_counter() - began)

    async def healthy(self) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _read(call) -> pb.GenerateResponse:
    """The call's next message; a failed call or an early end becomes an OpenAI-style error."""
    try:
        response = await call.read()
    except grpc.aio.AioRpcError as error:
        raise tr.from_grpc_error(error.code(), error.details(), _retry_after_ms(error.trailing_metadata())) from None
    if response is grpc.aio.EOF:
        code = await call.code()
        raise tr.from_grpc_error(code, await call.details() or "the orchestrator ended the stream early")
    return response


def _retry_after_ms(metadata) -> int | None:
    for key, value in metadata or ():
        if key == "retry-after-ms" and str(value).isdigit():
            return int(value)
    return None


async def _end(call) -> None:
    """Reads the call to its end after the last message, so that it finishes OK (the finally's
    cancel() is then a no-op) rather than as cancelled in the orchestrator's books."""
    try:
        await call.read()
    except grpc.aio.AioRpcError:
        pass  # the answer is complete; how the call ended changes nothing for this client


def _requested_method(body) -> str:
    method = body.speculation.method if body.speculation is not None else None
    return method.lower() if method else "default"


def create_app(orchestrator: str, model_name: str, api_key: str | None = None, metrics: GatewayMetrics | None = None,
               tls_ca: str | None = None) -> FastAPI:
    """The gateway for the orchestrator at `orchestrator` (host:port), serving `model_name`;
    TLS to the orchestrator, checked against the CA file `tls_ca`, when given."""
    gateway = Gateway(orchestrator, model_name, api_key, metrics or GatewayMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            gateway.channel = grpc.aio.secure_channel(orchestrator, credentials, options=CHANNEL_OPTIONS)
        else:
            gateway.channel = grpc.aio.insecure_channel(orchestrator, options=CHANNEL_OPTIONS)
        gateway.stub = orchestrator_pb2_grpc.OrchestratorStub(gateway.channel)
        gateway.health = health_pb2_grpc.HealthStub(gateway.channel)
        yield
        await gateway.channel.close()

    app = FastAPI(title="specserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(tr.GatewayError)
    async def gateway_error(request: Request, error: tr.GatewayError) -> JSONResponse:
        gateway.metrics.requests.labels(request.url.path, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.complete(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        gateway.check_key(request)
        gateway.metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse({"object": "list", "data": [
            {"id": gateway.model_name, "object": "model", "created": gateway.created, "owned_by": "specserve"}]})

    @app.get("/health")
    async def health() -> JSONResponse:
        if not await gateway.healthy():
            raise tr.GatewayError(503, f"the orchestrator at {orchestrator} is not serving", code="unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app
