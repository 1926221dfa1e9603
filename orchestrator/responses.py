"""Generate's responses, assembled from the decoding loop's chunks: the text detokenized
incrementally, stop strings applied, accepted proposals marked, the stats on the last one."""

from __future__ import annotations

import time

from specserve.core.async_decode import AheadStats
from specserve.core.speculate import Chunk, Finish
from specserve.core.text import IncrementalDetokenizer, StopStringFilter
from specserve.generation.plan import Plan
from specserve.generation.requests import Job
from specserve.v1 import common_pb2, orchestrator_pb2 as pb

FINISH = {Finish.LENGTH: pb.LENGTH, Finish.STOP: pb.STOP, Finish.EOS: pb.EOS}


class ResponseStream:
    """One request's responses: `push` each chunk of the loop in order; after the response
    that carries the finish reason (and the stats), `finished` is true."""

    def __init__(self, tokenizer, job: Job, run: Plan, began: float):
        self.job = job
        self.run = run
        self.began = began  # perf_counter when the request arrived
        self.detokenizer = IncrementalDetokenizer(tokenizer, job.prompt_ids)
        self.stops = StopStringFilter(job.sampling.stop)
        self.generated: list[int] = []
        self.first_token_ms: float | None = None
        self.finished = False
        self._accepted_so_far = self._proposed_so_far = 0

    def push(self, chunk: Chunk) -> pb.GenerateResponse | None:
        """The response for this chunk; None when it has nothing to send."""
        if self.first_token_ms is None:
            self.first_token_ms = (time.perf_counter() - self.began) * 1e3
        self.generated.extend(chunk.tokens)
        stats = self.run.decoding.stats
        # A verification's accepted proposals come first in its chunk; their text is
        # detokenized apart so that clients can tell them from the target's own token.
        accepted = min(stats.accepted_tokens - self._accepted_so_far, len(chunk.tokens))
        self._accepted_so_far = stats.accepted_tokens
        accepted_text = self.stops.push(self.detokenizer.push(chunk.tokens[:accepted])) if accepted else ""
        text = accepted_text + self.stops.push(self.detokenizer.push(chunk.tokens[accepted:]))
        marks = dict(accepted_tokens=accepted, accepted_text_length=len(accepted_text),
                     proposed_tokens=stats.proposed_tokens - self._proposed_so_far)
        self._proposed_so_far = stats.proposed_tokens
        finish = Finish.STOP if self.stops.stopped else chunk.finish
        if finish is None:
            return pb.GenerateResponse(token_ids=chunk.tokens, text=text, **marks) if chunk.tokens else None
        text += self.stops.push(self.detokenizer.flush()) + self.stops.flush()
        self.finished = True
        return pb.GenerateResponse(token_ids=chunk.tokens, text=text, **marks, finish_reason=FINISH[finish],
                                   stats=self._stats())

    def _stats(self) -> pb.GenerationStats:
        job, run, stats, ahead = self.job, self.run, self.run.decoding.stats, self.run.ahead
        proposer = run.proposer
        return pb.GenerationStats(
            prompt_tokens=len(job.prompt_ids),
            generated_tokens=len(self.generated),
            target_forward_passes=stats.target_forward_passes,
            proposed_tokens=stats.proposed_tokens,
            accepted_tokens=stats.accepted_tokens,
            wall_time_ms=(time.perf_counter() - self.began) * 1e3,
            mean_accepted_length=stats.mean_accepted_length,
            time_to_first_token_ms=self.first_token_ms or 0.0,
            method=job.method,
            draft_forward_passes=proposer.forward_passes if proposer else 0,
            lossy=job.lossy,
            target=serving_model(run.target.replica),
            draft=serving_model(getattr(proposer, "replica", None)),
            failovers=run.target.failovers + getattr(proposer, "failovers", 0),
            async_draft=ahead is not None and ahead.pipelined_steps > 0,
            synchronous_reason=run.synchronous_reason or (
                "auto: no step was expected to be faster drafting ahead"
                if ahead is not None and not ahead.pipelined_steps and job.async_draft == "auto" else ""),
            **(_ahead_fields(ahead) if ahead is not None else {}),
            step_timings=[
                pb.StepTiming(wall_ms=s.wall_ms, compute_ms=s.compute_ms, proposed=s.proposed, accepted=s.accepted)
                for s in stats.steps or []
            ],
        )


def serving_model(replica) -> common_pb2.ServingModel | None:
    """What a replica runs (from its last GetInfo), for a response's stats; None without one."""
    info = replica.info if replica is not None else None
    if info is None:
        return None
    return common_pb2.ServingModel(model=info.model, engine=info.engine, dtype=info.dtype, quantization=info.quantization)


def _ahead_fields(ahead: AheadStats) -> dict:
    """GenerationStats fields of drafting ahead."""
    return dict(pipelined_steps=ahead.pipelined_steps, outcomes_drafted=ahead.outcomes_drafted,
                outcome_hits=ahead.outcome_hits, stale_outcomes=ahead.stale_outcomes,
                draft_compute_ms=ahead.draft_compute_ms, draft_exposed_ms=ahead.draft_exposed_ms)
