"""Runs the target service: `python -m target_service` or `specserve target`."""

from __future__ import annotations

import argparse

from specserve.runtime.models import DEFAULT_MODEL
from specserve.serving.model_host import serve_model
from specserve.serving.options import add_model_service_arguments, run_or_exit
from specserve.v1 import target_pb2, target_pb2_grpc
from target_service.servicer import TargetServicer

DEFAULT_PORT = 50052


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_service_arguments(parser, "TARGET", DEFAULT_PORT, DEFAULT_MODEL)


def run(args: argparse.Namespace) -> None:
    serve_model(args, "target", TargetServicer, target_pb2_grpc.add_TargetServiceServicer_to_server,
                target_pb2.DESCRIPTOR.services_by_name["TargetService"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="target_service", description=__doc__)
    add_arguments(parser)
    run_or_exit(run, parser.parse_args(argv), "target_service")
