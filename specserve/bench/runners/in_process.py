"""One generation in this process: the core decode loop driving the models directly, no gRPC.

It does what the orchestrator does for a request minus the network: the same
tokenization (specserve.generation.requests.tokenize, chat template), the same default K and
cost-aware speculation control, the same proposers, incremental detokenization of the
output; so distributed / in-process is the cost of going over gRPC between processes.
"""

from __future__ import annotations

import asyncio
import time

from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import RunRecord
from specserve.client import build_request
from specserve.core.controller import speculation_policy
from specserve.core.lookahead_decode import decode_lookahead
from specserve.core.proposers import PromptLookupProposer, WithLookupBranch
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, decode
from specserve.core.text import IncrementalDetokenizer
from specserve.generation.requests import Limits, tokenize
from specserve.runtime.local import LocalTargetSession, local_draft_proposer
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

    def _speculation(self, method: str, k: int):
        drafted = method == "draft_model"
        trees = drafted and self.draft.needs_target_hidden_states and self.limits.tree_nodes > 0
        return speculation_policy(self.target_costs, self.draft_costs if drafted else None, k=k,
                                  k_max=self.limits.max_speculative_tokens, fixed=False,
                                  tree_nodes=self.limits.tree_nodes if trees else 0, tree_width=self.limits.tree_width)

    async def decode_ids(self, prompt_ids: list[int], method: str, max_new_tokens: int, step_timings: bool):
        """(generated token ids, DecodeStats) for one greedy request, as the orchestrator would run it."""
        k = self.limits.default_k.get(METHOD_ENUM[method], 0)
        proposer = None
        if method == "prompt_lookup":
            proposer = PromptLookupProposer()  # no shared pool: the stack runs without Redis too
        elif method == "draft_model":
            if self.draft is None:
                raise ValueError("draft_model needs a draft model")
            # A feature draft's variant when it is one, drafting trees as the orchestrator's would.
            proposer = local_draft_proposer(self.draft, self.limits.tree_shape(self.limits.tree_nodes))
            if self.draft.needs_target_hidden_states:
                proposer = WithLookupBranch(proposer)
        request = DecodeRequest(
            prompt=prompt_ids,
            sampling=SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
            seed=0,
            eos_token_ids=self.target.eos_token_ids,
            max_context_tokens=self.target.max_context_tokens,
            speculation=self._speculation(method, k) if k else None,
        )
        if step_timings:
            request.stats.steps = []
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer is not None else None
        generated: list[int] = []
        if method == "lookahead":  # no shared pool, as with prompt lookup
            steps = decode_lookahead(LocalTargetSession(self.target), request, self.limits.lookahead)
        else:
            steps = decode(LocalTargetSession(self.target), proposer, request)
        async for chunk in steps:
            generated.extend(chunk.tokens)
            if detokenizer is not None:
                detokenizer.push(chunk.tokens)
        if detokenizer is not None:
            detokenizer.flush()
        return generated, request.stats
