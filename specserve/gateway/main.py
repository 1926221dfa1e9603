"""Runs the gateway: `python -m specserve.gateway` or `specserve gateway`."""

from __future__ import annotations

import argparse
import logging

from specserve.serving.options import env_default

DEFAULT_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=env_default("SPECSERVE_HOST", "127.0.0.1"), help="address to listen on [env SPECSERVE_HOST]")
    parser.add_argument("--port", type=int, default=env_default("SPECSERVE_HTTP_PORT", DEFAULT_PORT),
                        help="HTTP port [env SPECSERVE_HTTP_PORT]")
    parser.add_argument("--orchestrator", default=env_default("SPECSERVE_ORCHESTRATOR_ADDR", "127.0.0.1:50051"),
                        help="the orchestrator's gRPC address [env SPECSERVE_ORCHESTRATOR_ADDR]")
    parser.add_argument("--served-model-name", default=env_default("SPECSERVE_SERVED_MODEL_NAME", "smollm2"),
                        help="the model name clients send and /v1/models lists [env SPECSERVE_SERVED_MODEL_NAME]")
    parser.add_argument("--api-key", default=env_default("SPECSERVE_API_KEY", ""),
                        help="require 'Authorization: Bearer KEY' on /v1/*, '' = open; the header also travels on to the "
                             "orchestrator, which checks it when started with --auth-token-file [env SPECSERVE_API_KEY]")
    parser.add_argument("--orchestrator-tls-ca", default=env_default("SPECSERVE_ORCHESTRATOR_TLS_CA", ""),
                        help="reach the orchestrator over TLS, checked against this CA file; '' = plaintext "
                             "[env SPECSERVE_ORCHESTRATOR_TLS_CA]")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from specserve.gateway.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    app = create_app(args.orchestrator, args.served_model_name, api_key=args.api_key or None,
                     tls_ca=args.orchestrator_tls_ca or None)
    logging.getLogger(__name__).info("OpenAI-compatible API on http://%s:%d/v1 for the orchestrator at %s",
                                     args.host, args.port, args.orchestrator)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="specserve gateway", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
