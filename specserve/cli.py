"""The `specserve` command: run services, the whole stack, a generation, the demo."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

DEMO_PROMPT = (
    "Rewrite this Python function so that it uses a list comprehension, keeping the names:\n\n"
    "def squares_of_evens(numbers):\n"
    "    result = []\n"
    "    for number in numbers:\n"
    "        if number % 2 == 0:\n"
    "            result.append(number * number)\n"
    "    return result\n"
)


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    from specserve.client import METHODS

    parser.add_argument("--method", choices=sorted(METHODS), default=None, help="default: the server's")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=None)
    parser.add_argument("--raw", action="store_true", help="send the prompt as raw text instead of a user chat message")


def _request(args: argparse.Namespace, prompt: str, method: str | None):
    from specserve.client import build_request

    messages = None if args.raw else [{"role": "user", "content": prompt}]
    return build_request(
        prompt=prompt if args.raw else None, messages=messages, method=method, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
        num_speculative_tokens=args.num_speculative_tokens, tree_nodes=getattr(args, "request_tree_nodes", None),
        **_lookahead_fields(getattr(args, "request_lookahead", None)), async_draft=getattr(args, "request_async_draft", None),
    )


def _lookahead_fields(text: str | None) -> dict:
    if not text:
        return {}
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise SystemExit(f"--lookahead: expected window,ngram,guesses as three integers, got {text!r}")
    return dict(zip(("lookahead_window", "lookahead_ngram", "lookahead_guesses"), map(int, parts)))


def cmd_generate(args: argparse.Namespace) -> int:
    from specserve.client import connect, describe, generate

    channel, stub = connect(args.address, tls_ca=args.tls_ca or None)
    with channel:
        result = generate(stub, _request(args, args.prompt, args.method), on_text=lambda t: print(t, end="", flush=True),
                          token=os.environ.get("SPECSERVE_AUTH_TOKEN") or None)
    print()
    print(describe(result.stats), file=sys.stderr)
    return 0


def _stack_flags(parser: argparse.ArgumentParser, port: int) -> None:
    from specserve.runtime.models import DEFAULT_MODEL, default_draft_model

    parser.add_argument("--port", type=int, default=port, help="the orchestrator's port")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "int8"], default="auto",
                        help="weights' dtype; auto: the one whose measured cost profile serves best on this machine")
    parser.add_argument("--target-model", default=DEFAULT_MODEL)
    parser.add_argument("--draft-model", default=default_draft_model(), help="'' for no draft service")
    parser.add_argument("--redis", default="auto", help="'auto' (start redis-server if installed), 'off', or a redis:// URL")
    parser.add_argument("--default-method", default="prompt_lookup")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per service, 0 = the engine's default (use 1 when the cores are shared with other work)")
    parser.add_argument("--engine", choices=["auto", "torch", "llama.cpp", "compiled"], default=os.environ.get("SPECSERVE_ENGINE", "auto"),
                        help="what runs the models: 'auto' = llama.cpp for GGUF models on the CPU when installed, else torch "
                             "[env SPECSERVE_ENGINE]")
    parser.add_argument("--log-dir", type=Path, default=None, help="write each service's log here")
    parser.add_argument("--auth-token-file", type=Path, default=None,
                        help="the orchestrator requires a bearer token listed in this file (or set SPECSERVE_AUTH_TOKEN)")
    parser.add_argument("--target-replicas", type=int, default=1, help="target service processes behind the orchestrator")
    parser.add_argument("--draft-replicas", type=int, default=1, help="draft service processes behind the orchestrator")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also start the OpenAI-compatible gateway (and its page) on this port")
    parser.add_argument("--metrics", action="store_true", help="every gRPC service serves Prometheus metrics on a free port")
    parser.add_argument("--async-draft", choices=["off", "on", "auto"], default="auto",
                        help="DRAFT_MODEL with a token draft, greedy: draft the next step while the target verifies this "
                             "one; auto: where the measured costs expect it to be faster")
    add_tree_flags(parser)


def add_tree_flags(parser: argparse.ArgumentParser) -> None:
    """The tree shape a feature draft drafts for greedy requests (depth: the step's K)."""
    from specserve.core.tree import TreeShape

    parser.add_argument("--tree-nodes", type=int, default=TreeShape.nodes,
                        help="nodes of a feature draft's trees for greedy requests, 0 = chains")
    parser.add_argument("--tree-width", type=int, default=TreeShape.width, help="nodes of a tree level expanded further")
    parser.add_argument("--tree-branch", type=int, default=TreeShape.branch, help="children drafted per expanded node")


def _stack_config(args: argparse.Namespace):
    from specserve.launcher import StackConfig

    return StackConfig(target_model=args.target_model, draft_model=args.draft_model or None, dtype=args.dtype,
                       port=args.port, redis=args.redis, default_method=args.default_method, threads=args.threads,
                       engine=args.engine, log_dir=args.log_dir, tree_nodes=args.tree_nodes, tree_width=args.tree_width, tree_branch=args.tree_branch,
                       target_replicas=args.target_replicas, draft_replicas=args.draft_replicas,
                       auth_token_file=args.auth_token_file, http_port=args.http_port, metrics=args.metrics,
                       async_draft=args.async_draft)


def cmd_up(args: argparse.Namespace) -> int:
    from specserve.launcher import Stack

    def interrupt(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops everything the way Ctrl-C does

    signal.signal(signal.SIGTERM, interrupt)
    with Stack(_stack_config(args)) as stack:
        print(f"specserve is up: orchestrator at {stack.address} (Ctrl-C stops everything)", flush=True)
        if stack.http_address:
            print(f"OpenAI-compatible API at http://{stack.http_address}/v1, the page at http://{stack.http_address}/", flush=True)
        for name, address in stack.metrics_addresses.items():
            print(f"{name} metrics at http://{address}/metrics", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from specserve.demo import run_demo

    return run_demo(args, _stack_config(args), _request)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from specserve.runtime.models import resolve_model_dir

    print(resolve_model_dir(args.model))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server says SERVING: a container healthcheck (docker-compose)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                               timeout=args.timeout).status
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}", file=sys.stderr)
            return 1
    print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_service(module: str):
    def run(args: argparse.Namespace) -> int:
        __import__(module, fromlist=["run"]).run(args)
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description="Speculative decoding served as gRPC microservices.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, module, help_text in [
        ("target", "target_service.main", "run the target service"),
        ("draft", "draft_service.main", "run the draft service"),
        ("orchestrator", "orchestrator.main", "run the orchestrator"),
        ("gateway", "specserve.gateway.main", "run the OpenAI-compatible HTTP gateway (and its page, /metrics)"),
    ]:
        p = sub.add_parser(name, help=help_text)
        __import__(module, fromlist=["add_arguments"]).add_arguments(p)
        p.set_defaults(func=cmd_service(module))

    p = sub.add_parser("up", help="start every service on loopback; Ctrl-C stops them")
    _stack_flags(p, 50051)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("generate", help="stream one generation from a running orchestrator")
    p.add_argument("prompt")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--tls-ca", default="", help="speak TLS, checking the server against this CA file")
    _add_generation_flags(p)
    p.add_argument("--tree-nodes", dest="request_tree_nodes", type=int, default=None,
                   help="nodes of a feature draft's trees (greedy only), 0 = chains; default: the server's")
    p.add_argument("--lookahead", dest="request_lookahead", default=None,
                   help="LOOKAHEAD's window,ngram,guesses (W,N,G); default: the server's")
    p.add_argument("--async-draft", dest="request_async_draft", choices=["off", "on", "auto"], default=None,
                   help="DRAFT_MODEL: draft the next step while the target verifies this one; default: the server's")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="start the stack, stream one generation with its stats and speedup, stop")
    _stack_flags(p, 0)
    _add_generation_flags(p)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.set_defaults(func=cmd_demo)

    _add_health_command(sub)

    p = sub.add_parser("prepare-model", help="convert a model once to the local safetensors cache; print its directory")
    p.add_argument("model", nargs="?", default="smollm2")
    p.set_defaults(func=cmd_prepare_model)

    _add_optional_commands(sub)
    return parser


def _add_health_command(sub) -> None:
    p = sub.add_parser("health", help="check a server's gRPC health; exit 0 when SERVING (for container healthchecks)")
    p.add_argument("address", nargs="?", default="127.0.0.1:50051")
    p.add_argument("--service", default="", help="a service name; '' = the server as a whole")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_health)


def _add_optional_commands(sub) -> None:
    """Commands that live in their own packages: bench and the draft trainers."""
    for name, module, help_text in [
        ("bench", "specserve.bench.cli", "benchmark every method side by side"),
        ("profile", "specserve.bench.profile_report", "measure (or show the cached) cost of a forward pass here"),
        ("train-draft", "specserve.drafter.train_features", "distill a feature draft (the default draft) from the target"),
        ("train-token-draft", "specserve.drafter.train", "distill a small token-level draft model from the target"),
        ("train-medusa", "specserve.drafter.train_medusa", "train Medusa-1 heads on the frozen target"),
    ]:
        mod = __import__(module, fromlist=["add_arguments", "run"])
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=lambda args, mod=mod: mod.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["health"]:
        # A container's healthcheck, every few seconds: parsed without importing every command's
        # module (torch and transformers alone take seconds to import on a busy machine).
        parser = argparse.ArgumentParser(prog="specserve")
        _add_health_command(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)

    from specserve.runtime.models import ModelUnavailable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelUnavailable as error:
        # A setup problem: the message names the missing piece and the command that fixes it.
        print(f"specserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
