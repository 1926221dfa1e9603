"""Runs the draft service: `python -m draft_service` or `specserve draft`."""

from __future__ import annotations

import argparse

from draft_service.servicer import DraftServicer
from specserve.runtime.models import default_draft_model
from specserve.serving.model_host import serve_model
from specserve.serving.options import add_model_service_arguments, run_or_exit
from specserve.v1 import draft_pb2, draft_pb2_grpc

DEFAULT_PORT = 50053


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_service_arguments(parser, "DRAFT", DEFAULT_PORT, default_draft_model())


def run(args: argparse.Namespace) -> None:
    serve_model(args, "draft", DraftServicer, draft_pb2_grpc.add_DraftServiceServicer_to_server,
                draft_pb2.DESCRIPTOR.services_by_name["DraftService"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="draft_service", description=__doc__)
    add_arguments(parser)
    run_or_exit(run, parser.parse_args(argv), "draft_service")
