"""What target and draft services share: the model, its worker thread, session count."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from specserve.core.sampling import SamplingConfig
from specserve.runtime.engine import Engine, Op
from specserve.runtime.scheduler import DEFAULT_TOKEN_BUDGET, BatchScheduler, token_budget_from_profile
from specserve.serving.grpc_server import SessionLimit, status_on_error
from specserve.serving.metrics import ModelServiceMetrics, serve_metrics
from specserve.v1 import common_pb2, model_service_pb2

T = TypeVar("T")


class ModelHost:
    """A loaded model whose forward passes run on one model thread, off the event loop.

    One thread (2 cores are saturated by one forward pass) runs every session's work
    through a `BatchScheduler`: ops that arrive together share forward passes
    (continuous batching), so the event loop stays free to move messages.
    """

    def __init__(self, loaded: Engine, max_sessions: int, threads: int | None = None,
                 cost_profile: model_service_pb2.CostProfile | None = None, metrics: ModelServiceMetrics | None = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, batching: bool = True, device: str = "cpu"):
        self.loaded = loaded
        self.device = device
        self.sessions = SessionLimit(max_sessions)
        self.metrics = metrics
        if threads:
            torch.set_num_threads(threads)
        self.cost_profile = cost_profile  # measured (or cached) at start-up; None: not measured
        self.scheduler = BatchScheduler(loaded, token_budget, batching,
                                        on_pass=metrics.observe_pass if metrics is not None else None)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the model thread, between forward passes."""
        return await self._wait(self.scheduler.submit_call(fn, *args))

    async def run_op(self, op: Op[T], owner: object) -> T:
        """A worker op (`runtime/engine.py`) whose forward passes are batched with other sessions'."""
        return await self._wait(self.scheduler.submit_op(op, owner))

    async def close_session(self, worker) -> None:
        """Frees a worker's session, after dropping any op of it still waiting for a pass."""
        await self._wait(self.scheduler.submit_call(worker.close, drop_ops_of=worker))

    @staticmethod
    async def _wait(future: concurrent.futures.Future):
        # A caller that goes away cancels work not yet begun; begun work runs to its end.
        return await asyncio.wrap_future(future)

    @property
    def queued(self) -> int:
        """Work waiting for the model thread."""
        return self.scheduler.queued

    def info(self) -> model_service_pb2.ModelInfo:
        return model_service_pb2.ModelInfo(
            model=self.loaded.spec,
            vocab_size=self.loaded.vocab_size,
            max_context_tokens=self.loaded.max_context_tokens,
            eos_token_ids=sorted(self.loaded.eos_token_ids),
            dtype=self.loaded.dtype_name,
            active_sessions=self.sessions.active,
            max_sessions=self.sessions.limit,
            needs_target_hidden_states=self.loaded.needs_target_hidden_states,
            cost_profile=self.cost_profile,
            batch_token_budget=self.scheduler.token_budget if self.scheduler.batching else 0,
            mean_batch_tokens=self.scheduler.mean_batch_tokens,
            queued_ops=self.queued,
            engine=self.loaded.engine_name,
            quantization=self.loaded.quantization,
            device=self.device,
        )


def sampling_from_proto(params: common_pb2.SamplingParams) -> SamplingConfig:
    """The decoding parameters a model session needs (validated by the orchestrator)."""
    return SamplingConfig(
        temperature=params.temperature,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
    )


def serve_model(args, role: str, make_servicer, add_to_server, service) -> None:
    """Loads the model named by the flags and serves it until SIGINT/SIGTERM.

    role: "target" or "draft"; add_to_server/service: the generated gRPC glue.
    """
    import logging

    from specserve.loading import load_model
    from specserve.serving.grpc_server import run_server
    from specserve.serving.security import server_tls

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    if not args.model:
        raise SystemExit(f"{role}: no model given (--model)")
    from specserve.dtype_choice import resolve_dtype
    from specserve.loading import resolve_engine
    from specserve.runtime.profile import profile_for
    from specserve.serving import cost_profile

    metrics = ModelServiceMetrics(role) if getattr(args, "metrics_port", 0) else None
    if args.threads:
        torch.set_num_threads(args.threads)
    # An explicit --dtype is served as asked (torch) or refused with the flags named (llama.cpp).
    engine_name = resolve_engine(args.engine, args.model, args.device, args.dtype)
    # dtype auto measures the torch engine's choices; llama.cpp computes in the GGUF's own types.
    if engine_name == "torch":
        dtype = resolve_dtype(args.dtype, args.model, role, args.device)
    elif engine_name == "compiled":  # its dtype as asked; auto: float32, exactly plain decoding's numerics
        dtype = "float32" if args.dtype == "auto" else args.dtype
    else:
        dtype = "auto"
    engine = load_model(args.model, dtype, args.device, engine=engine_name, threads=args.threads)
    logging.info("%s serves on the %s engine: weights %s, quantization %s", args.model, engine.engine_name,
                 engine.dtype_name, engine.quantization)
    # What a forward costs here, measured before serving (a few seconds, once per machine: cached).
    measured = profile_for(engine, role, args.device)
    if measured is not None:
        logging.info("cost profile (%s): %s", "cached" if measured.from_cache else f"measured in {measured.measured_s:.1f} s",
                     measured.machine.get("cpu"))
    budget = args.max_batch_tokens or (token_budget_from_profile(measured.costs) if measured else DEFAULT_TOKEN_BUDGET)
    host = ModelHost(engine, args.max_sessions, args.threads, cost_profile.to_proto(measured) if measured else None, metrics,
                     token_budget=budget, batching=args.batching == "on", device=args.device)
    logging.info("batching %s: at most %d tokens per forward pass", "on" if host.scheduler.batching else "off", budget)
    if metrics is not None:
        metrics.queued.set_function(lambda: host.queued)
        serve_metrics(metrics.registry, args.host, args.metrics_port)

    def register(server) -> list[str]:
        add_to_server(make_servicer(host), server)
        return [service.full_name]

    asyncio.run(run_server(register, args.host, args.port, tls=server_tls(args)))


class SessionServicer:
    """GetInfo and the Session stream loop, shared by the target and draft servicers.

    Subclasses name their worker class (or override `new_worker`) and convert one
    request to one response in `_handle`; listed before the generated servicer
    base, this overrides its methods.
    """

    worker_class: type

    def __init__(self, host: ModelHost):
        self.host = host

    async def GetInfo(self, request, context):
        return self.host.info()

    async def Session(self, request_iterator, context):
        metrics = self.host.metrics
        async with status_on_error(context):
            with self.host.sessions.hold(), metrics.session() if metrics else contextlib.nullcontext():
                worker = self.new_worker()
                try:
                    async for request in request_iterator:
                        began = time.perf_counter()
                        response = await self._handle(worker, request)
                        if metrics is not None:
                            metrics.observe_op(request, time.perf_counter() - began)
                        yield response
                finally:
                    # On the model thread: an op of this session may still be running there.
                    await self.host.close_session(worker)

    def new_worker(self):
        return self.worker_class(self.host.loaded)

    async def _handle(self, worker, request):
        raise NotImplementedError
