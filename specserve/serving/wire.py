"""Bytes that are not the request message at all get INVALID_ARGUMENT.

gRPC answers a request it cannot decode with UNKNOWN ("Unexpected DecodeError"),
which reads like a server fault. This interceptor decodes our services' requests
itself and turns a corrupt message into a clear status naming the message type.
"""

from __future__ import annotations

import grpc

# Only the project's own services: their handlers are coroutines and async generators.
OWN_SERVICES = "/specserve."


class _Malformed:
    """Stands in for a request that did not decode."""


MALFORMED = _Malformed()


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or not details.method.startswith(OWN_SERVICES):
            return handler
        return _tolerant(handler, details.method)


def _tolerant(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    message = f"request: the bytes sent to {method} are not a valid request message"

    def decode(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # a DecodeError, or anything a corrupt message provokes
            return MALFORMED

    async def refuse(context) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def checked(requests, context):
        async for request in requests:
            if request is MALFORMED:
                await refuse(context)
            yield request

    kinds = dict(request_deserializer=decode, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        async def unary_unary(request, context):
            if request is MALFORMED:
                await refuse(context)
            return await handler.unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, **kinds)
    if handler.unary_stream:
        async def unary_stream(request, context):
            if request is MALFORMED:
                await refuse(context)
            async for response in handler.unary_stream(request, context):
                yield response
        return grpc.unary_stream_rpc_method_handler(unary_stream, **kinds)
    if handler.stream_unary:
        async def stream_unary(requests, context):
            return await handler.stream_unary(checked(requests, context), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, **kinds)

    async def stream_stream(requests, context):
        async for response in handler.stream_stream(checked(requests, context), context):
            yield response
    return grpc.stream_stream_rpc_method_handler(stream_stream, **kinds)
