"""Proposers that need no model: prompt lookup over the request's own tokens."""

from __future__ import annotations

from specserve.core.prompt_lookup import find_continuation
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import Proposal


class PromptLookupProposer:
    """Proposes what followed the last n-gram's latest earlier occurrence (deterministic)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.forward_passes = 0

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        return None

    async def propose(self, sequence: list[int], k: int) -> Proposal:
        return Proposal(find_continuation(sequence, k, self.max_ngram, self.min_ngram))
