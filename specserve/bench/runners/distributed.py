"""One generation through the served stack: client -> orchestrator -> target/draft services."""

from __future__ import annotations

import time

from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import RunRecord
from specserve.client import build_request, connect, generate

REQUEST_TIMEOUT_S = 1800.0


class DistributedRunner:
    mode = "distributed"

    def __init__(self, address: str, mode: str = "distributed"):
        self.channel, self.stub = connect(address)
        self.mode = mode

    def run(self, prompt: BenchPrompt, method: str, max_new_tokens: int, step_timings: bool = False) -> RunRecord:
        request = build_request(messages=prompt.messages(), method=method, max_new_tokens=max_new_tokens, temperature=0.0)
        request.include_step_timings = step_timings
        began = time.perf_counter()
        result = generate(self.stub, request, timeout_s=REQUEST_TIMEOUT_S)
        wall_s = time.perf_counter() - began
        stats = result.stats
        return RunRecord(
            mode=self.mode,
            method=method,
            prompt_id=prompt.prompt_id,
            category=prompt.category,
            token_ids=list(result.token_ids),
            wall_s=wall_s,
            decode_steps=max(stats.target_forward_passes - 1, 0),  # prefill excluded
            proposed=stats.proposed_tokens,
            accepted=stats.accepted_tokens,
            step_timings=[(s.wall_ms, s.compute_ms) for s in stats.step_timings],
        )

    def close(self) -> None:
        self.channel.close()
