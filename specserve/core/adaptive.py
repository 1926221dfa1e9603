"""Adaptive speculation length: propose more while proposals are accepted, fewer when not."""

from __future__ import annotations


class SpeculationLength:
    """K for the next step, updated from each verification.

    All k accepted: K grows by 2 (the target agreed with everything, so it is
    likely to agree with more). Otherwise K shrinks by 1, never below k_min. This follows transformers' heuristic for
    assisted generation and keeps a poor proposer close to plain decoding's cost.
    """

    def __init__(self, initial: int, k_min: int = 1, k_max: int = 16, fixed: bool = False):
        if not 1 <= k_min <= initial <= k_max:
            raise ValueError(f"need 1 <= k_min <= initial <= k_max, got {k_min}, {initial}, {k_max}")
        self.k = initial
        self.k_min = k_min
        self.k_max = k_max
        self.fixed = fixed

    def update(self, proposed: int, accepted: int) -> None:
        if self.fixed or proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, self.k_min)
