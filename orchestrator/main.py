"""Runs the orchestrator: `python -m orchestrator` or `specserve orchestrator`."""

from __future__ import annotations

import argparse
import asyncio
import logging

from orchestrator.costs import round_trip_ms
from orchestrator.metered import MeteredOrchestratorServicer
from orchestrator.replicas import AdmissionQueue, ReplicaSet
from orchestrator.servicer import OrchestratorServicer
from orchestrator.sessions import Upstreams
from specserve.core.lookahead import LookaheadShape
from specserve.core.ngram_pool import InMemoryNgramPool
from specserve.core.tree import MAX_TREE_NODES, TreeShape
from specserve.generation import requests
from specserve.runtime.models import DEFAULT_MODEL, load_tokenizer
from specserve.serving.grpc_server import run_server
from specserve.serving.metrics import OrchestratorMetrics, serve_metrics
from specserve.serving.options import env_default, run_or_exit
from specserve.serving.security import (
    BearerTokenInterceptor, add_auth_arguments, add_server_tls_arguments, add_upstream_tls_arguments, load_tokens, server_tls,
    upstream_tls,
)
from specserve.v1 import draft_pb2_grpc, orchestrator_pb2 as pb, orchestrator_pb2_grpc, target_pb2_grpc

DEFAULT_PORT = 50051
METHODS = {name.lower(): value for name, value in pb.Method.items() if value}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=env_default("SPECSERVE_HOST", "127.0.0.1"), help="address to listen on [env SPECSERVE_HOST]")
    parser.add_argument("--port", type=int, default=env_default("SPECSERVE_PORT", DEFAULT_PORT), help="port [env SPECSERVE_PORT]")
    parser.add_argument("--target", default=env_default("SPECSERVE_TARGET_ADDR", "127.0.0.1:50052"),
                        help="target replicas: dns:///name:port (every address the name resolves to, re-resolved "
                             "every few seconds) or host:port[,host:port...] [env SPECSERVE_TARGET_ADDR]")
    parser.add_argument("--draft", default=env_default("SPECSERVE_DRAFT_ADDR", "127.0.0.1:50053"),
                        help="draft replicas, as --target; '' for none [env SPECSERVE_DRAFT_ADDR]")
    parser.add_argument("--tokenizer", default=env_default("SPECSERVE_TOKENIZER", DEFAULT_MODEL),
                        help="the target model's tokenizer (a model specification) [env SPECSERVE_TOKENIZER]")
    parser.add_argument("--redis-url", default=env_default("SPECSERVE_REDIS_URL", ""),
                        help="Redis for the n-gram pool shared by replicas; '' keeps the pool in this process, 'off' "
                             "disables it [env SPECSERVE_REDIS_URL]")
    parser.add_argument("--lookahead", default=env_default("SPECSERVE_LOOKAHEAD", _shape_text(LookaheadShape())),
                        help="LOOKAHEAD's default window,ngram,guesses (W,N,G) [env SPECSERVE_LOOKAHEAD]")
    parser.add_argument("--default-method", default=env_default("SPECSERVE_DEFAULT_METHOD", "prompt_lookup"), choices=sorted(METHODS),
                        help="method for requests that name none [env SPECSERVE_DEFAULT_METHOD]")
    parser.add_argument("--max-new-tokens", type=int, default=env_default("SPECSERVE_MAX_NEW_TOKENS", 4096),
                        help="limit on max_new_tokens [env SPECSERVE_MAX_NEW_TOKENS]")
    parser.add_argument("--max-speculative-tokens", type=int, default=env_default("SPECSERVE_MAX_SPECULATIVE_TOKENS", 32),
                        help="limit on num_speculative_tokens [env SPECSERVE_MAX_SPECULATIVE_TOKENS]")
    parser.add_argument("--tree-nodes", type=int, default=env_default("SPECSERVE_TREE_NODES", TreeShape.nodes),
                        help=f"a feature draft's trees for greedy requests: nodes at most, in [0, {MAX_TREE_NODES}], 0 = chains; "
                             "a request's speculation.tree_nodes overrides it [env SPECSERVE_TREE_NODES]")
    parser.add_argument("--tree-width", type=int, default=env_default("SPECSERVE_TREE_WIDTH", TreeShape.width),
                        help="nodes of a tree level expanded further [env SPECSERVE_TREE_WIDTH]")
    parser.add_argument("--metrics-port", type=int, default=env_default("SPECSERVE_METRICS_PORT", 0),
                        help="serve Prometheus metrics over HTTP on this port, 0 = off [env SPECSERVE_METRICS_PORT]")
    parser.add_argument("--tree-branch", type=int, default=env_default("SPECSERVE_TREE_BRANCH", TreeShape.branch),
                        help="children drafted per expanded node [env SPECSERVE_TREE_BRANCH]")
    parser.add_argument("--speculation-control", default=env_default("SPECSERVE_SPECULATION_CONTROL", "cost"),
                        choices=["cost", "adaptive"],
                        help="cost: choose K / tree size per step from the services' measured cost profiles and the "
                             "acceptance seen; adaptive: the cost-blind adaptive K [env SPECSERVE_SPECULATION_CONTROL]")
    parser.add_argument("--async-draft", default=env_default("SPECSERVE_ASYNC_DRAFT", "auto"), choices=list(requests.ASYNC_DRAFT_MODES),
                        help="DRAFT_MODEL with a token draft, greedy: the draft drafts the next step for the likeliest "
                             "verdicts while the target verifies this one; auto: in the steps where the measured costs and "
                             "acceptance expect it to be faster; a request's speculation.async_draft overrides it "
                             "[env SPECSERVE_ASYNC_DRAFT]")
    parser.add_argument("--async-outcomes", type=int, default=env_default("SPECSERVE_ASYNC_OUTCOMES", 3),
                        help="asynchronous drafting: the most verdicts drafted ahead per step, in [1, 8] (1 where the "
                             "draft does not batch) [env SPECSERVE_ASYNC_OUTCOMES]")
    parser.add_argument("--max-queued", type=int, default=env_default("SPECSERVE_MAX_QUEUED", 256),
                        help="requests that may wait for a target session while every replica is full; more get "
                             "RESOURCE_EXHAUSTED [env SPECSERVE_MAX_QUEUED]")
    parser.add_argument("--queue-timeout-s", type=float, default=env_default("SPECSERVE_QUEUE_TIMEOUT_S", 30.0),
                        help="how long a request waits for a session before RESOURCE_EXHAUSTED [env SPECSERVE_QUEUE_TIMEOUT_S]")
    parser.add_argument("--op-timeout-s", type=float, default=env_default("SPECSERVE_OP_TIMEOUT_S", 60.0),
                        help="a replica that takes longer over one op counts as failed and the session moves "
                             "[env SPECSERVE_OP_TIMEOUT_S]")
    add_server_tls_arguments(parser)
    add_auth_arguments(parser)
    add_upstream_tls_arguments(parser)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    try:
        limits = requests.Limits(
            max_new_tokens=args.max_new_tokens,
            max_speculative_tokens=args.max_speculative_tokens,
            default_method=METHODS[args.default_method],
            tree_nodes=args.tree_nodes,
            tree_width=args.tree_width,
            tree_branch=args.tree_branch,
            speculation_control=args.speculation_control,
            lookahead=requests.parse_shape(args.lookahead),
            async_draft=args.async_draft,
            async_outcomes=args.async_outcomes,
        )
    except ValueError as error:
        raise SystemExit(f"orchestrator: {error} (--tree-nodes, --tree-width, --tree-branch, --lookahead, "
                         "--async-outcomes)") from None
    tokenizer = load_tokenizer(args.tokenizer)
    asyncio.run(_serve(args, tokenizer, limits))


async def _serve(args: argparse.Namespace, tokenizer, limits: requests.Limits) -> None:
    tls = upstream_tls(args)
    credentials = tls.credentials() if tls else None
    upstreams = Upstreams(
        target=ReplicaSet("target", args.target, target_pb2_grpc.TargetServiceStub, credentials=credentials),
        draft=ReplicaSet("draft", args.draft, draft_pb2_grpc.DraftServiceStub, credentials=credentials) if args.draft else None,
    )
    # Discovery and health polls run for the server's lifetime.
    watchers = [asyncio.create_task(replicas.run()) for replicas in (upstreams.target, upstreams.draft) if replicas]
    redis_client = None
    if args.redis_url and args.redis_url != "off":
        import redis.asyncio as redis

        redis_client = redis.from_url(args.redis_url, socket_connect_timeout=0.25, socket_timeout=0.5)
    pool = None if args.redis_url == "off" else InMemoryNgramPool()
    options = dict(pool=pool, admission=AdmissionQueue(args.max_queued, args.queue_timeout_s), op_timeout_s=args.op_timeout_s)
    metrics = OrchestratorMetrics() if args.metrics_port else None
    if metrics is None:
        servicer = OrchestratorServicer(upstreams, tokenizer, limits, **options)
    else:
        servicer = MeteredOrchestratorServicer(upstreams, tokenizer, limits, metrics=metrics, **options)
        metrics.queued.set_function(lambda: servicer.admission.waiting)
        metrics_server = serve_metrics(metrics.registry, args.host, args.metrics_port)

    async def wait_ready() -> None:
        # SERVING only once a target replica answers (and a draft replica, when configured).
        info = await upstreams.target.wait_healthy()
        upstreams.target_round_trip_ms = await round_trip_ms(upstreams.target.healthy()[0].stub.GetInfo)
        if upstreams.draft is not None:
            # Whether the draft needs the target's hidden states decides the proposer.
            await upstreams.draft.wait_healthy()
            upstreams.draft_round_trip_ms = await round_trip_ms(upstreams.draft.healthy()[0].stub.GetInfo)
        if redis_client is not None:
            from orchestrator.ngram_pool import RedisNgramPool

            servicer.pool = RedisNgramPool(redis_client, namespace=fingerprint(info, tokenizer),
                                           on_lookup=metrics.pool_lookup if metrics else None)

    def register(server) -> list[str]:
        orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name]

    try:
        tokens = load_tokens(args)
        await run_server(register, args.host, args.port, wait_ready=wait_ready, with_reflection=True, tls=server_tls(args),
                         interceptors=[BearerTokenInterceptor(tokens)] if tokens else [])
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if redis_client is not None:
            if hasattr(servicer.pool, "close"):
                await servicer.pool.close()
            await redis_client.aclose()
        if metrics is not None:
            metrics_server.shutdown()


def _shape_text(shape: LookaheadShape) -> str:
    return f"{shape.window},{shape.ngram},{shape.guesses}"


def fingerprint(info, tokenizer) -> str:
    """A short hash of the model and tokenizer: pools of different models never mix."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(f"{info.model}|{info.vocab_size}".encode())
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}:{token}\n".encode())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    add_arguments(parser)
    run_or_exit(run, parser.parse_args(argv), "orchestrator")
