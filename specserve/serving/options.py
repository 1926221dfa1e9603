"""Command-line flags whose defaults come from environment variables (read when parsing)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def env_default(name: str, default):
    """The environment's value for a flag, else the default; typed like the default."""
    value = os.environ.get(name)
    if value is None:
        return default
    return type(default)(value) if default is not None else value


def add_model_service_arguments(parser: argparse.ArgumentParser, role: str, port: int, model: str | None) -> None:
    """Flags of a service that hosts a model; role is TARGET or DRAFT (env prefix SPECSERVE_<ROLE>_)."""
    prefix = f"SPECSERVE_{role}_"
    parser.add_argument("--model", default=env_default(prefix + "MODEL", model),
                        help=f"model: 'smollm2', a .gguf file or a model directory [env {prefix}MODEL]")
    parser.add_argument("--dtype", default=env_default("SPECSERVE_DTYPE", "auto"), choices=["auto", "float32", "bfloat16", "int8"],
                        help="weights' dtype; auto: the one whose measured cost profile serves best here [env SPECSERVE_DTYPE]")
    parser.add_argument("--engine", default=env_default("SPECSERVE_ENGINE", "auto"), choices=["auto", "torch", "llama.cpp", "compiled"],
                        help="what runs the model: 'auto' = llama.cpp for a GGUF model on the CPU when installed and "
                             "--dtype is auto, else torch; llama.cpp with an explicit --dtype is refused; 'compiled': "
                             "torch.compile over static caches (--dtype int8 too) [env SPECSERVE_ENGINE]")
    parser.add_argument("--device", default=env_default("SPECSERVE_DEVICE", "cpu"), help="torch device [env SPECSERVE_DEVICE]")
    parser.add_argument("--host", default=env_default("SPECSERVE_HOST", "127.0.0.1"), help="address to listen on [env SPECSERVE_HOST]")
    parser.add_argument("--port", type=int, default=env_default(prefix + "PORT", port), help=f"port [env {prefix}PORT]")
    parser.add_argument("--max-sessions", type=int, default=env_default(prefix + "MAX_SESSIONS", 64),
                        help=f"sessions held at once; more get RESOURCE_EXHAUSTED [env {prefix}MAX_SESSIONS]")
    parser.add_argument("--batching", default=env_default("SPECSERVE_BATCHING", "on"), choices=["on", "off"],
                        help="run ops of different sessions that wait together in one forward pass (continuous "
                             "batching) [env SPECSERVE_BATCHING]")
    parser.add_argument("--max-batch-tokens", type=int, default=env_default(prefix + "MAX_BATCH_TOKENS", 0),
                        help="tokens per forward pass, 0 = from the measured cost profile; longer prompts are "
                             f"prefilled in chunks [env {prefix}MAX_BATCH_TOKENS]")
    parser.add_argument("--metrics-port", type=int, default=env_default(prefix + "METRICS_PORT", 0),
                        help=f"serve Prometheus metrics over HTTP on this port, 0 = off [env {prefix}METRICS_PORT]")
    parser.add_argument("--threads", type=int, default=env_default("SPECSERVE_THREADS", 0),
                        help="CPU threads (torch or llama.cpp), 0 = the engine's default [env SPECSERVE_THREADS]")
    from specserve.serving.security import add_server_tls_arguments

    add_server_tls_arguments(parser)


def run_or_exit(run: Callable[[argparse.Namespace], None], args: argparse.Namespace, prog: str) -> None:
    """Runs a service; a setup problem (say, the default model's package missing) ends it with
    the message that names the fix instead of a traceback."""
    from specserve.loading import IncompatibleOptions
    from specserve.runtime.models import ModelUnavailable

    try:
        run(args)
    except (ModelUnavailable, IncompatibleOptions) as error:
        sys.exit(f"{prog}: error: {error}")
