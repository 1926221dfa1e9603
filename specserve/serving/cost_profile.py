"""Cost profiles on the wire: runtime.profile.MeasuredProfile -> ModelInfo.cost_profile -> core.controller.CostProfile."""

from __future__ import annotations

from specserve.core.controller import CostPoint, CostProfile, CostTable
from specserve.runtime.profile import TABLES, MeasuredProfile
from specserve.v1 import model_service_pb2


def to_proto(profile: MeasuredProfile) -> model_service_pb2.CostProfile:
    message = model_service_pb2.CostProfile(
        cpu=profile.machine.get("cpu", ""), cpu_flags=profile.machine.get("flags", []),
        threads=profile.machine.get("threads", 0), memory_gb_s=profile.memory_gb_s, matmul_gflop_s=profile.matmul_gflop_s,
        measured_ms=profile.measured_s * 1e3, from_cache=profile.from_cache,
    )
    for name in TABLES:
        table = getattr(profile.costs, name)
        for p in table.points if table is not None else ():
            getattr(message, name).add(context_tokens=p.context_tokens, new_tokens=p.new_tokens, ms=p.ms,
                                       bytes_read=p.bytes_read, flops=p.flops)
    return message


def from_proto(message: model_service_pb2.CostProfile) -> CostProfile:
    """The controller's view; tables the service did not measure stay None."""
    tables = {}
    for name in TABLES:
        points = getattr(message, name)
        if points:
            tables[name] = CostTable.of(CostPoint(p.context_tokens, p.new_tokens, p.ms, p.bytes_read, p.flops) for p in points)
    return CostProfile(**tables)
