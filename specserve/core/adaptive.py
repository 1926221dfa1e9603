"""Adaptive speculation length: propose more while proposals are accepted, fewer when
not, and none for a while when even one proposal keeps failing."""

from __future__ import annotations


class SpeculationLength:
    """K for the next step, updated from each verification.

    All k accepted: K grows by 2 (the target agreed with everything, so it is
    likely to agree with more). Otherwise K shrinks by 1, never below k_min
    (transformers' heuristic for assisted generation). When a proposal of k_min
    tokens is rejected outright, speculation pauses: the next steps are plain
    decoding (K = 0), for 1 step, then 2, 4, ... up to max_pause while it keeps
    failing. A poor proposer thus costs little over plain decoding.
    """

    def __init__(self, initial: int, k_min: int = 1, k_max: int = 16, fixed: bool = False, max_pause: int = 16):
        if not 1 <= k_min <= initial <= k_max:
            raise ValueError(f"need 1 <= k_min <= initial <= k_max, got {k_min}, {initial}, {k_max}")
        self._k = initial
        self.k_min = k_min
        self.k_max = k_max
        self.fixed = fixed
        self.max_pause = max_pause
        self._paused_steps = 0  # plain-decoding steps left before proposing again
        self._next_pause = 1

    @property
    def k(self) -> int:
        """Tokens to propose in the next step (0: decode plainly this step)."""
        return 0 if self._paused_steps else self._k

    def update(self, proposed: int, accepted: int) -> None:
        if self.fixed:
            return
        if proposed == 0:
            self._paused_steps = max(self._paused_steps - 1, 0)
            return
        if accepted == proposed:
            self._k = min(self._k + 2, self.k_max)
            self._next_pause = 1
        elif accepted == 0 and self._k == self.k_min:
            self._paused_steps = self._next_pause
            self._next_pause = min(2 * self._next_pause, self.max_pause)
        else:
            self._k = max(self._k - 1, self.k_min)
            if accepted:
                self._next_pause = 1

    # The decoding loop's interface (see core.controller.SpeculationController): this
    # policy ignores costs and context, and proposes chains only.
    def plan(self, context: int, remaining: int):
        from specserve.core.controller import StepPlan

        return StepPlan(self.k)

    def record(self, plan, depth: int, nodes: int, accepted: int) -> None:
        self.update(depth, accepted)
