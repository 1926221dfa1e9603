"""One generation in this process: the core decode loop driving the models directly, no gRPC.

It does what the orchestrator does for a request minus the network: the same
tokenization (specserve.generation.requests.tokenize, chat template), and the same
planner (specserve.generation.plan: default K, cost-aware speculation control, proposers,
decoding loop), then incremental detokenization of the output; so distributed /
in-process is the cost of going over gRPC between processes.
"""

from __future__ import annotations

import asyncio
import time

from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import RunRecord
from specserve.client import build_request
from specserve.core.sampling import SamplingConfig
from specserve.core.text import IncrementalDetokenizer
from specserve.core.tree import TreeShape
from specserve.generation.plan import Serving, plan
from specserve.generation.requests import Job, Limits, tokenize
from specserve.runtime.local import LocalDraftProposer, LocalFeatureDraftProposer, LocalTargetSession, local_draft_proposer
from specserve.runtime.models import LoadedModel
from specserve.runtime.profile import profile_for
from specserve.v1 import orchestrator_pb2 as pb

METHOD_ENUM = {"autoregressive": pb.AUTOREGRESSIVE, "prompt_lookup": pb.PROMPT_LOOKUP, "draft_model": pb.DRAFT_MODEL,
               "lookahead": pb.LOOKAHEAD}


class InProcessRunner:
    mode = "in_process"

    def __init__(self, target: LoadedModel, draft: LoadedModel | None, tokenizer, limits: Limits | None = None):
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        self.limits = limits or Limits()
        # The same cost profiles the services measure (cached per machine), for the same control.
        target_profile = profile_for(target, "target")
        draft_profile = profile_for(draft, "draft") if draft is not None else None
        self.target_costs = target_profile.costs if target_profile else None
        self.draft_costs = draft_profile.costs if draft_profile else None

    def skip_reason(self, method: str) -> str | None:
        """Why this runner cannot run `method`, or None."""
        if method == "medusa":
            return "MEDUSA runs through the served stack only (heads co-located with the target service)"
        return None

    def run(self, prompt: BenchPrompt, method: str, max_new_tokens: int, step_timings: bool = False) -> RunRecord:
        began = time.perf_counter()
        prompt_ids = tokenize(build_request(messages=prompt.messages()), self.tokenizer)
        token_ids, stats = asyncio.run(self.decode_ids(prompt_ids, method, max_new_tokens, step_timings))
        wall_s = time.perf_counter() - began
        return RunRecord(
            mode=self.mode,
            method=method,
            prompt_id=prompt.prompt_id,
            category=prompt.category,
            token_ids=token_ids,
            wall_s=wall_s,
            decode_steps=stats.decode_steps,
            proposed=stats.proposed_tokens,
            accepted=stats.accepted_tokens,
            step_timings=[(s.wall_ms, s.compute_ms) for s in stats.steps or []],
        )

    def job(self, prompt_ids: list[int], method: str, max_new_tokens: int) -> Job:
        """The job the orchestrator would make of a greedy request for `method` that sets nothing else."""
        method_id = METHOD_ENUM[method]
        return Job(prompt_ids, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens), seed=0, method=method_id,
                   k=self.limits.default_k.get(method_id, 0), fixed_length=False, tree_nodes=self.limits.tree_nodes,
                   lookahead=self.limits.lookahead if method_id == pb.LOOKAHEAD else None)

    def serving(self) -> Serving:
        """The models in this process; no shared n-gram pool (the stack runs without Redis too)."""
        return Serving(
            open_target=lambda: LocalTargetSession(self.target),
            open_draft=self._open_draft,
            eos_token_ids=self.target.eos_token_ids,
            max_context_tokens=self.target.max_context_tokens,
            target_costs=self.target_costs,
            draft_costs=self.draft_costs,
            draft_needs_target_hidden_states=self.draft is not None and self.draft.needs_target_hidden_states,
        )

    def _open_draft(self, tree: TreeShape | None) -> LocalDraftProposer | LocalFeatureDraftProposer:
        if self.draft is None:
            raise ValueError("draft_model needs a draft model")
        return local_draft_proposer(self.draft, tree)

    async def decode_ids(self, prompt_ids: list[int], method: str, max_new_tokens: int, step_timings: bool):
        """(generated token ids, DecodeStats) for one greedy request, as the orchestrator would run it."""
        run = plan(self.job(prompt_ids, method, max_new_tokens), self.limits, self.serving(), step_timings)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer is not None else None
        generated: list[int] = []
        async for chunk in run.steps:
            generated.extend(chunk.tokens)
            if detokenizer is not None:
                detokenizer.push(chunk.tokens)
        if detokenizer is not None:
            detokenizer.flush()
        return generated, run.decoding.stats
