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
from specserve.runtime.engine import Engine
from specserve.serving.grpc_server import SessionLimit, status_on_error
from specserve.serving.metrics import ModelServiceMetrics, serve_metrics
from specserve.v1 import common_pb2, model_service_pb2

T = TypeVar("T")


class ModelHost:
    """A loaded model whose forward passes run in one dedicated thread, off the event loop.

    One thread: sessions take turns on the model (2 cores are saturated by one
    forward pass), and the event loop stays free to move messages.
    """

    def __init__(self, loaded: Engine, max_sessions: int, threads: int | None = None,
                 metrics: ModelServiceMetrics | None = None):
        self.loaded = loaded
        self.sessions = SessionLimit(max_sessions)
        self.metrics = metrics
        # Calls handed to the model thread, and calls it began: one writer each (the event
        # loop, the model thread), so the difference (the queue) needs no lock.
        self._submitted = 0
        self._begun = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        if threads:
            torch.set_num_threads(threads)

    async def run(self, fn: Callable[..., T], *args) -> T:
        self._submitted += 1
        future = self._executor.submit(self._begin, fn, *args)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if future.cancelled():  # the caller went away before the call began: it never will
                self._submitted -= 1

    def _begin(self, fn: Callable[..., T], *args) -> T:
        self._begun += 1
        return fn(*args)

    @property
    def queued(self) -> int:
        """Calls waiting for the model thread (the one it runs excluded)."""
        return self._submitted - self._begun

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
    metrics = ModelServiceMetrics(role) if getattr(args, "metrics_port", 0) else None
    host = ModelHost(load_model(args.model, args.dtype, args.device), args.max_sessions, args.threads, metrics)
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
                    await self.host.run(worker.close)

    def new_worker(self):
        return self.worker_class(self.host.loaded)

    async def _handle(self, worker, request):
        raise NotImplementedError
