"""Who may call: bearer tokens on the public API, TLS on any server, mutual TLS between
the orchestrator and the model services.

Tokens come from a file (one per line) or SPECSERVE_AUTH_TOKEN, are compared in
constant time, and are never logged. Health checks and reflection stay open, so load
balancers and probes need no token.
"""

from __future__ import annotations

import argparse
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from specserve.serving.options import env_default

# Methods anyone may call: probes and service discovery.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key; with client_ca, clients must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        root = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=root,
                                           require_client_auth=root is not None)


@dataclass(frozen=True)
class ClientTls:
    """How a client checks a server (ca) and, for mutual TLS, proves itself (cert, key)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", default=env_default("SPECSERVE_TLS_CERT", ""),
                        help="serve TLS with this certificate chain (PEM) [env SPECSERVE_TLS_CERT]")
    parser.add_argument("--tls-key", default=env_default("SPECSERVE_TLS_KEY", ""),
                        help="the certificate's private key (PEM) [env SPECSERVE_TLS_KEY]")
    parser.add_argument("--tls-client-ca", default=env_default("SPECSERVE_TLS_CLIENT_CA", ""),
                        help="require client certificates signed by this CA: mutual TLS [env SPECSERVE_TLS_CLIENT_CA]")


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    return ServerTls(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None)


def add_upstream_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream-ca", default=env_default("SPECSERVE_UPSTREAM_CA", ""),
                        help="reach the target and draft services over TLS, checking them with this CA [env SPECSERVE_UPSTREAM_CA]")
    parser.add_argument("--upstream-cert", default=env_default("SPECSERVE_UPSTREAM_CERT", ""),
                        help="certificate presented to them (mutual TLS) [env SPECSERVE_UPSTREAM_CERT]")
    parser.add_argument("--upstream-key", default=env_default("SPECSERVE_UPSTREAM_KEY", ""),
                        help="its private key [env SPECSERVE_UPSTREAM_KEY]")


def upstream_tls(args: argparse.Namespace) -> ClientTls | None:
    if not args.upstream_ca:
        if args.upstream_cert or args.upstream_key:
            raise SystemExit("--upstream-cert/--upstream-key need --upstream-ca")
        return None
    if bool(args.upstream_cert) != bool(args.upstream_key):
        raise SystemExit("mutual TLS needs both --upstream-cert and --upstream-key")
    return ClientTls(Path(args.upstream_ca), Path(args.upstream_cert) if args.upstream_cert else None,
                     Path(args.upstream_key) if args.upstream_key else None)


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth-token-file", default=env_default("SPECSERVE_AUTH_TOKEN_FILE", ""),
                        help="require 'authorization: Bearer <token>' with a token listed in this file, one per line "
                             "[env SPECSERVE_AUTH_TOKEN_FILE; or one token in SPECSERVE_AUTH_TOKEN]")


def load_tokens(args: argparse.Namespace) -> list[str]:
    """The accepted tokens: the file's lines and SPECSERVE_AUTH_TOKEN; empty means no authentication."""
    tokens = []
    if args.auth_token_file:
        try:
            lines = Path(args.auth_token_file).read_text().splitlines()
        except OSError as error:
            raise SystemExit(f"cannot read --auth-token-file: {error.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not tokens:
            raise SystemExit("--auth-token-file lists no token")
    if os.environ.get("SPECSERVE_AUTH_TOKEN"):
        tokens.append(os.environ["SPECSERVE_AUTH_TOKEN"].strip())
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call but health and reflection without a listed token."""

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("no tokens")
        self._tokens = [token.encode() for token in tokens]

    def _allowed(self, metadata) -> bool:
        value = dict(metadata or ()).get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Every token is compared, in constant time, so timing tells nothing about which matched.
        matches = [hmac.compare_digest(token.strip().encode(), known) for known in self._tokens]
        return any(matches)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or self._allowed(details.invocation_metadata):
            return handler
        return _denying(handler)


_DENIED = "a valid bearer token is required (metadata 'authorization: Bearer <token>')"


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # an async generator, as streaming handlers are

    serdes = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **serdes)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serdes)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **serdes)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **serdes)
