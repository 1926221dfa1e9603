"""Runs the target service: `python -m target_service` or `specserve target`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from specserve.runtime.models import DEFAULT_MODEL, DTYPES, SHIPPED_DRAFTS
from specserve.serving.model_host import serve_model
from specserve.serving.options import add_model_service_arguments, env_default, run_or_exit
from specserve.v1 import target_pb2, target_pb2_grpc
from target_service.servicer import TargetServicer

log = logging.getLogger(__name__)

DEFAULT_PORT = 50052
# Medusa heads trained for the default target, shipped with the project.
SHIPPED_MEDUSA = SHIPPED_DRAFTS / "smollm2-135m-medusa"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_service_arguments(parser, "TARGET", DEFAULT_PORT, DEFAULT_MODEL)
    parser.add_argument("--medusa", default=env_default("SPECSERVE_TARGET_MEDUSA", "auto"),
                        help="Medusa heads to host beside the model (a checkpoint directory in the published layout); "
                             "'auto': the shipped heads for the default model; '': none [env SPECSERVE_TARGET_MEDUSA]")


def medusa_heads_dir(args: argparse.Namespace) -> Path | None:
    if args.medusa == "auto":
        shipped = args.model == DEFAULT_MODEL and (SHIPPED_MEDUSA / "config.json").is_file()
        return SHIPPED_MEDUSA if shipped else None
    return Path(args.medusa) if args.medusa else None


def run(args: argparse.Namespace) -> None:
    directory = medusa_heads_dir(args)

    def servicer(host) -> TargetServicer:
        heads = None
        if directory is not None and not (host.loaded.returns_hidden_states and host.loaded.supports_trees):
            # The heads read the last hidden state and propose trees; without them MEDUSA is refused
            # (FAILED_PRECONDITION) and every other method serves as usual.
            log.warning("Medusa heads %s are not hosted: the %s engine returns no hidden states or trees",
                        directory, host.loaded.engine_name)
        elif directory is not None:
            from specserve.drafter.medusa import load_medusa

            # In the dtype the engine resolved (dtype auto); float32 beside an engine with its own types
            # (llama.cpp's hidden states come out in float32).
            heads, _ = load_medusa(directory, DTYPES.get(host.loaded.dtype_name, DTYPES["float32"]))
            log.info("Medusa heads %s hosted beside the model (%d heads)", directory, heads.num_heads)
        return TargetServicer(host, heads=heads)

    serve_model(args, "target", servicer, target_pb2_grpc.add_TargetServiceServicer_to_server,
                target_pb2.DESCRIPTOR.services_by_name["TargetService"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="target_service", description=__doc__)
    add_arguments(parser)
    run_or_exit(run, parser.parse_args(argv), "target_service")
