"""Server start-up, health checking, reflection and the exception -> status mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve.core.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, Unimplemented,
)
from specserve.serving.security import ServerTls
from specserve.serving.wire import MalformedRequestInterceptor

log = logging.getLogger(__name__)

# The one limit on message size, for every server and every channel between services
# (gRPC's default is 4 MB). The large messages: draft distributions can be dense over
# the whole vocabulary (4 x 49152 entries is ~1.6 MB), and a prompt's hidden states for
# a feature draft take 4 x hidden size bytes per token in float32 (2.3 KB for SmolLM2:
# 19 MB for its whole 8,192-token context).
MESSAGE_LIMIT = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
]

_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class UpstreamError(Exception):
    """A call to another service failed; carries its status to our caller."""

    def __init__(self, code: grpc.StatusCode, message: str, unsent: bool = False):
        super().__init__(message)
        self.code = code
        self.unsent = unsent  # the op never reached the service (its stream had already ended)


@contextlib.asynccontextmanager
async def status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Maps the core's errors to gRPC status codes; anything else is INTERNAL, logged."""
    try:
        yield
    except tuple(_STATUS) as error:
        retry_after_ms = getattr(error, "retry_after_ms", None)
        if retry_after_ms is not None:
            context.set_trailing_metadata((("retry-after-ms", str(retry_after_ms)),))
        await context.abort(_STATUS[type(error)], str(error))
    except UpstreamError as error:
        await context.abort(error.code, str(error))
    except grpc.aio.AbortError:  # already a status (an abort inside the block)
        raise
    except Exception as error:  # a bug: report it instead of hanging the caller
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error!r}")


class SessionLimit:
    """Counts open sessions; refuses more than `limit` at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise ResourceExhausted(f"the service holds its limit of {self.limit} sessions; retry later")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def run_server(
    register: Callable[[grpc.aio.Server], list[str]],
    host: str,
    port: int,
    wait_ready: Callable[[], Awaitable[None]] | None = None,
    with_reflection: bool = False,
    tls: ServerTls | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Serves until SIGINT/SIGTERM. `register` adds servicers and returns their full names.

    Health says NOT_SERVING until `wait_ready` (e.g. "the upstream services answer")
    completes, then SERVING. With `tls`, the port speaks TLS only (mutual TLS when it
    names a client CA); `interceptors` see every call (e.g. bearer-token checks).
    """
    # No SO_REUSEPORT: a second server on a taken port must fail, not share its traffic.
    # Undecodable requests get INVALID_ARGUMENT first; then the caller's interceptors (e.g. tokens).
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
                             interceptors=[MalformedRequestInterceptor(), *interceptors])
    names = register(server)
    health_servicer = health.aio.HealthServicer()
    # The servicer starts with the overall status SERVING; say NOT_SERVING until ready.
    await set_serving(health_servicer, names, False)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if with_reflection:
        reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    await server.start()
    log.info("listening on %s:%d%s (%s)", host, bound, " with TLS" if tls else "", ", ".join(names))
    async def become_ready() -> None:
        if wait_ready is not None:
            await wait_ready()
        await set_serving(health_servicer, names, True)

    readiness = asyncio.create_task(become_ready())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    readiness.cancel()
    await set_serving(health_servicer, names, False)
    await server.stop(grace=2.0)


async def set_serving(health_servicer: health.aio.HealthServicer, names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await health_servicer.set(name, status)
