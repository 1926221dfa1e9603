"""The replicas of one service: discovery, health, load, placement.

An address names a service: `dns:///name:port` means every address the name
resolves to, re-resolved every few seconds (docker-compose and Kubernetes headless
services resolve a service name to all of its replicas); `file:PATH` means the
addresses listed in that file, one per line, re-read as often (for whatever
writes such a file: a config management tool, a test); `host:port,host:port`
is a static list. Each replica has its own channel and is polled with GetInfo,
which answers on the service's event loop even while its model computes: the
poll is the health check and the load report (active sessions, limit). A new
session goes to the healthy replica with the lowest load; a replica that stops
answering is marked failed, and every session on it is told at once (its
`failed` event), so requests fail over without waiting out their own timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specserve.core.errors import ResourceExhausted, Unavailable
from specserve.serving.grpc_server import CHANNEL_OPTIONS
from specserve.v1 import model_service_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaTiming:
    """How often replicas are looked for and polled, and how long a poll may take."""

    resolve_every_s: float = 5.0
    poll_every_s: float = 0.5
    poll_timeout_s: float = 1.0
    # Consecutive failed polls before a replica that answered before counts as failed.
    failures_to_fail: int = 2


def parse_addresses(spec: str) -> tuple[str, str | list[str]]:
    """("dns", "name:port") | ("file", path) | ("static", [addresses])."""
    spec = spec.strip()
    if spec.startswith("dns:///"):
        return "dns", spec.removeprefix("dns:///")
    if spec.startswith("file:"):
        return "file", spec.removeprefix("file:")
    return "static", [a.strip() for a in spec.split(",") if a.strip()]


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: object
    info: model_service_pb2.ModelInfo | None = None
    healthy: bool = False
    failed_polls: int = 0
    # Sessions this orchestrator holds there now (placed and not yet released), and the
    # sessions others (other orchestrators) held at the last poll: together the load,
    # current for our own sessions rather than as old as the last poll.
    ours: int = 0
    others: int = 0
    # Set when the replica is seen failing; sessions on it fail over. Replaced when it recovers.
    failed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def sessions(self) -> int:
        return self.others + self.ours

    @property
    def load(self) -> float:
        """Share of the replica's session limit in use."""
        return self.sessions / max(1, self.info.max_sessions) if self.info else 0.0

    @property
    def pass_load(self) -> float:
        """How full the replica's forward passes ran lately (continuous batching: tokens per
        pass over its budget; plus its backlog), at the last poll; 0 when it does not batch."""
        if not self.info or not self.info.batch_token_budget:
            return 0.0
        return (self.info.mean_batch_tokens + self.info.queued_ops) / self.info.batch_token_budget

    @property
    def full(self) -> bool:
        return self.info is not None and self.sessions >= self.info.max_sessions


class ReplicaSet:
    """Every replica of one service, kept current by a background task (`run`)."""

    def __init__(self, name: str, spec: str, make_stub: Callable[[grpc.aio.Channel], object],
                 timing: ReplicaTiming = ReplicaTiming(), credentials: grpc.ChannelCredentials | None = None):
        self.name = name
        self.credentials = credentials  # TLS (mutual, with a client certificate) to every replica; None: plaintext
        self.kind, self.where = parse_addresses(spec)
        self.make_stub = make_stub
        self.timing = timing
        self.replicas: dict[str, Replica] = {}
        self.changed = asyncio.Event()  # set whenever a replica becomes healthy
        self.last_info: model_service_pb2.ModelInfo | None = None

    # -- placement -------------------------------------------------------------------------
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    def info(self) -> model_service_pb2.ModelInfo | None:
        """What the replicas last said about their model (replicas of a service serve one
        model); None until one has answered."""
        return self.last_info

    def pick(self, exclude: frozenset[str] = frozenset()) -> Replica:
        """The least-loaded healthy replica not in `exclude` that has room for a session.
        Raises Unavailable when no replica is healthy, ReplicasFull when all are full."""
        healthy = [r for r in self.healthy() if r.address not in exclude]
        if not healthy:
            raise Unavailable(f"no healthy {self.name} replica; retry shortly")
        candidates = [r for r in healthy if not r.full]
        if not candidates:
            raise ReplicasFull(f"every {self.name} replica holds its limit of sessions")
        # Sessions first; between replicas holding as many, the one whose passes run lighter.
        replica = min(candidates, key=lambda r: (r.load, r.pass_load, r.address))
        replica.ours += 1
        return replica

    @staticmethod
    def release(replica: Replica) -> None:
        """A session placed by `pick` has ended (or never opened)."""
        replica.ours = max(0, replica.ours - 1)

    async def wait_healthy(self, timeout_s: float | None = None) -> model_service_pb2.ModelInfo:
        """Blocks until some replica answers; its model facts."""
        async def wait() -> model_service_pb2.ModelInfo:
            while not self.healthy():
                self.changed.clear()
                await self.changed.wait()
            return self.last_info
        return await asyncio.wait_for(wait(), timeout_s)

    # -- discovery and health ----------------------------------------------------------------
    async def run(self) -> None:
        """Resolves and polls forever (cancel to stop); closes every channel when stopped."""
        try:
            resolved_at = -float("inf")
            loop = asyncio.get_running_loop()
            while True:
                if loop.time() - resolved_at >= self.timing.resolve_every_s:
                    await self._refresh_addresses()
                    resolved_at = loop.time()
                await asyncio.gather(*(self._poll(r) for r in list(self.replicas.values())))
                await asyncio.sleep(self.timing.poll_every_s)
        finally:
            for replica in self.replicas.values():
                await replica.channel.close()

    async def _refresh_addresses(self) -> None:
        if self.kind == "dns":
            addresses = await self._resolve(self.where)
        elif self.kind == "file":
            try:
                lines = Path(self.where).read_text().splitlines()
            except OSError as error:
                log.warning("cannot read the %s replicas' file (%s)", self.name, error)
                lines = []
            addresses = [a for a in (line.split("#")[0].strip() for line in lines) if a]
        else:
            addresses = list(self.where)
        if not addresses and self.kind != "static":
            return  # a failed lookup keeps what we know
        for address in addresses:
            if address not in self.replicas:
                channel = (grpc.aio.secure_channel(address, self.credentials, options=CHANNEL_OPTIONS) if self.credentials
                           else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
                self.replicas[address] = Replica(address, channel, self.make_stub(channel))
                log.info("%s replica %s added", self.name, address)
        for address in [a for a in self.replicas if a not in addresses]:
            # Gone from DNS: no new sessions; sessions on it go on until it fails or they end.
            replica = self.replicas.pop(address)
            log.info("%s replica %s removed", self.name, address)
            asyncio.get_running_loop().call_later(60, lambda c=replica.channel: asyncio.ensure_future(c.close()))

    async def _resolve(self, host_port: str) -> list[str]:
        host, _, port = host_port.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as error:
            log.warning("cannot resolve %s (%s)", host_port, error)
            return []
        found = []
        for family, *_, sockaddr in infos:
            ip = sockaddr[0]
            address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
            if address not in found:
                found.append(address)
        return sorted(found)

    async def _poll(self, replica: Replica) -> None:
        try:
            info = await replica.stub.GetInfo(model_service_pb2.GetInfoRequest(), timeout=self.timing.poll_timeout_s)
        except grpc.aio.AioRpcError as error:
            replica.failed_polls += 1
            never_answered = replica.info is None
            if replica.healthy and replica.failed_polls >= self.timing.failures_to_fail:
                replica.healthy = False
                replica.failed.set()
                log.warning("%s replica %s failed (%s)", self.name, replica.address, error.code().name)
            elif never_answered and replica.failed_polls == 1:
                log.info("waiting for %s replica %s (%s)", self.name, replica.address, error.code().name)
            return
        replica.info = info
        self.last_info = info
        # Ours that had not opened yet are not in the count: others is never below 0.
        replica.others = max(0, info.active_sessions - replica.ours)
        replica.failed_polls = 0
        if not replica.healthy:
            if replica.failed.is_set():
                replica.failed = asyncio.Event()
            replica.healthy = True
            log.info("%s replica %s is serving (%d/%d sessions)", self.name, replica.address,
                     info.active_sessions, info.max_sessions)
            self.changed.set()

    def mark_failed(self, replica: Replica, reason: str) -> None:
        """A session saw the replica fail (its stream broke): no new sessions until a poll succeeds."""
        if replica.healthy:
            replica.healthy = False
            replica.failed.set()
            log.warning("%s replica %s failed (%s)", self.name, replica.address, reason)


async def race_failure(operation, replica: Replica):
    """Awaits `operation` unless the replica fails first; then raises ReplicaFailed."""
    task = asyncio.ensure_future(operation)
    failed = asyncio.ensure_future(replica.failed.wait())
    try:
        done, _ = await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ReplicaFailed(f"replica {replica.address} stopped answering health polls")
    finally:
        failed.cancel()
        if not task.done():
            task.cancel()
            # The operation may still end with its own error (its stream was closed under it): nobody waits for it.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


class ReplicaFailed(Exception):
    """The replica a session was on is gone; the session must move."""


class ReplicasFull(Exception):
    """Every healthy replica holds as many sessions as it accepts."""


class AdmissionQueue:
    """Requests waiting for a target session while every replica is full: at most
    `max_waiting` of them, each for at most `wait_s`; beyond either, RESOURCE_EXHAUSTED
    with a retry hint. Going over a limit never looks like a server fault."""

    def __init__(self, max_waiting: int = 256, wait_s: float = 30.0):
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def place(self):
        if self.waiting >= self.max_waiting:
            raise ResourceExhausted(f"every replica is at its session limit and {self.waiting} requests are waiting; "
                                    "retry in a few seconds", retry_after_ms=2000)
        self.waiting += 1
        try:
            yield asyncio.get_running_loop().time() + self.wait_s
        finally:
            self.waiting -= 1
