"""What the orchestrator knows of its services' costs, for speculation control: the cost
profiles their GetInfo reports and the round trip of one op, measured once at start-up."""

from __future__ import annotations

import functools
import time

from specserve.core.controller import CostProfile
from specserve.serving import cost_profile
from specserve.v1 import model_service_pb2


def costs_of(info: model_service_pb2.ModelInfo | None) -> CostProfile | None:
    """The service's measured cost profile; None when it reported none (a simulated model)."""
    if info is None or not info.HasField("cost_profile"):
        return None
    return _costs(info.cost_profile.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=16)
def _costs(serialized: bytes) -> CostProfile | None:
    # Replicas poll every half second with the same profile: convert each distinct one once.
    costs = cost_profile.from_proto(model_service_pb2.CostProfile.FromString(serialized))
    return costs if costs.verify_chain or costs.draft_step else None


async def round_trip_ms(get_info, calls: int = 5) -> float:
    """Median GetInfo round trip: what each op to that service adds to a step."""
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        await get_info(model_service_pb2.GetInfoRequest(), timeout=2.0)
        times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]
