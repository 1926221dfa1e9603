"""The proposer for Medusa heads co-located with the target.

The target computes the next candidates in the same forward pass that verifies
the current ones and returns them with its verdict, so this proposer only hands
back what the target last sent: there is no draft round trip. The decoding loop
passes `target_options` to the target's start and gives every response's
candidates to `observe_target_candidates`.
"""

from __future__ import annotations

from typing import Any

from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import Proposal
from specserve.core.tree import DraftTree


class ColocatedMedusaProposer:
    forward_passes = 0  # the heads run inside the target's forward pass
    last_compute_ms = 0.0

    def __init__(self, target_options: Any):
        # What the target session's start takes to run its heads (opaque here: the
        # MedusaParams message over gRPC, MedusaOptions in process).
        self.target_options = target_options
        self.candidates: Proposal = Proposal([])

    async def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        return None

    def observe_target_candidates(self, candidates: Proposal | None) -> None:
        if candidates is None:
            raise RuntimeError("the target service returned no Medusa candidates for a MEDUSA request")
        self.candidates = candidates

    async def propose(self, sequence: list[int], k: int) -> Proposal:
        """The target's last candidates, cut to depth k (a chain to k tokens)."""
        proposal = self.candidates
        if not proposal.parents:
            return Proposal(proposal.tokens[:k])
        if proposal.depth <= k:
            return proposal
        tree = DraftTree(proposal.tokens, proposal.parents)
        # Nodes come by depth, so the shallow ones are a prefix and keep their parents' indices.
        keep = sum(1 for d in tree.depths() if d <= k)
        return Proposal(tree.tokens[:keep], None, tree.parents[:keep])
