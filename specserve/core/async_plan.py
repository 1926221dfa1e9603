"""When and how much to draft ahead (asynchronous drafting), from costs and acceptance.

A pipelined step sends its proposal (L tokens) to the target and, at the same time,
asks the draft to draft the next proposal (k_ahead tokens) for the likeliest verdicts.
If the verdict matches one, that proposal goes to the target at once (a *hit*); if
not, the next proposal is drafted now (k_fresh tokens, on the critical path; 0: a
plain step). With per-position acceptance a, the draft's first guess of the bonus
token right with a as well, a verify of L proposals costing T(L), a draft forward
pass d, round trips r_t and r_d:

- a proposal of L tokens yields E(L) = 1 + a + ... + a^L tokens and is followed by a
  hit with h(L) = a^(L+1) (all accepted, the bonus guessed);
- drafting ahead takes S = (k_ahead + 1) d + r_d (one pass to guess the bonus, then
  k_ahead; every outcome's rows ride in the same passes);
- a hit step lasts max(T(k_ahead) + r_t, S); a fresh step k_fresh d + r_d (if any)
  more, with L = k_fresh; the share of hit steps is h(k_fresh) / (1 - h(k_ahead) + h(k_fresh)).

The planner picks (k_ahead, k_fresh) with the most expected tokens per ms and compares
it with the best synchronous step, E(k) / (T(k) + k d + r_t + r_d). Costs come from the
services' cost profiles when both report one (so plans depend on the profiles and the
acceptance record only, as the cost-aware controller's do), else from the compute times
this request has measured, verify and draft times measured while the other service was
busy too kept apart (on shared hardware each slows the other). `auto` drafts ahead only
while that is expected to be at least 5% faster, and never when the two services share
a CPU's cores (both on "cpu": overlapping them buys little there); `on` always.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.core.controller import CostProfile

AUTO_MARGIN = 1.05  # auto drafts ahead when that is expected this much faster than synchronous steps
DECAY = 0.8  # per observation: how fast measured costs follow
PRIOR_ACCEPTANCE = 0.6
PRIOR_WEIGHT = 2.0  # in examined positions
ACCEPTANCE_DECAY = 0.95  # per verdict
PLAN_K_MAX = 12  # the longest proposal a plan considers
# Outcomes beside the likeliest are drafted while they earn their keep: once this many (decayed)
# were drafted and fewer than EXTRA_MIN_HIT_RATE of them matched a verdict, only the likeliest is,
# with the full budget again every EXTRA_PROBE_EVERY steps.
EXTRA_EVIDENCE = 8.0
EXTRA_MIN_HIT_RATE = 0.03
EXTRA_PROBE_EVERY = 16


@dataclass(frozen=True)
class AheadPlan:
    pipelined: bool  # draft ahead this step
    k_ahead: int  # tokens drafted ahead per outcome
    k_fresh: int  # tokens drafted on the critical path after a miss (0: a plain step)
    expected_rate: float = 0.0  # tokens per ms expected of the plan (0: costs unknown)
    sync_rate: float = 0.0  # of the best synchronous step


class _Mean:
    """A decaying mean of measurements; None before the first."""

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else DECAY * self.value + (1 - DECAY) * x


def expected_tokens(a: float, proposal_len: int) -> float:
    return sum(a**i for i in range(proposal_len + 1))


class AheadPlanner:
    def __init__(self, mode: str, k_default: int, k_max: int, target: CostProfile | None = None,
                 draft: CostProfile | None = None, target_round_trip_ms: float = 0.0, draft_round_trip_ms: float = 0.0,
                 fixed: bool = False, shared_cores: bool = False):
        """k_default: proposals before costs are known; fixed: always k_default (a request's fixed_length);
        shared_cores: target and draft compute on the same CPU (auto then never drafts ahead)."""
        if mode not in ("on", "auto"):
            raise ValueError(f"mode must be on or auto, got {mode!r}")
        self.mode = mode
        self.k_default = max(k_default, 1)
        self.k_max = max(k_max, 1)
        profiled = target is not None and target.verify_chain is not None and draft is not None and draft.draft_step is not None
        self.target, self.draft = (target, draft) if profiled else (None, None)
        self.shared_cores = shared_cores
        self.rtt_target = target_round_trip_ms
        self.rtt_draft = draft_round_trip_ms
        self.fixed = fixed
        self.verify_ms = {False: _Mean(), True: _Mean()}  # per verify op: alone / with drafting ahead running
        self.draft_pass_ms = {False: _Mean(), True: _Mean()}  # per draft forward pass: fresh / ahead
        self._examined = 0.0
        self._accepted = 0.0
        self._extra_drafted = 0.0  # outcomes drafted beside the likeliest (decayed), and those a verdict matched
        self._extra_hits = 0.0
        self._steps_since_probe = 0
        self._extras_off = False

    # ---- measurements ------------------------------------------------------------------
    def observe_verdict(self, proposal_len: int, accepted: int) -> None:
        self._examined = ACCEPTANCE_DECAY * self._examined + min(proposal_len, accepted + 1)
        self._accepted = ACCEPTANCE_DECAY * self._accepted + accepted

    def observe_verify(self, ms: float, overlapped: bool) -> None:
        self.verify_ms[overlapped].add(ms)

    def observe_draft(self, ms: float, passes: int, ahead: bool) -> None:
        if passes > 0:
            self.draft_pass_ms[ahead].add(ms / passes)

    def observe_outcomes(self, drafted: int, matched: int | None) -> None:
        """A step's outcomes: how many were drafted, and the index of the one the verdict matched."""
        extra_hit = matched is not None and matched > 0
        self._extra_drafted = ACCEPTANCE_DECAY * self._extra_drafted + max(drafted - 1, 0)
        self._extra_hits = ACCEPTANCE_DECAY * self._extra_hits + (1.0 if extra_hit else 0.0)
        if extra_hit:
            self._extras_off = False

    def outcome_budget(self, limit: int) -> int:
        """Outcomes to draft ahead this step, at most `limit` (see EXTRA_EVIDENCE)."""
        self._steps_since_probe += 1
        if self._extra_drafted >= EXTRA_EVIDENCE:
            self._extras_off = self._extra_hits < EXTRA_MIN_HIT_RATE * self._extra_drafted
        if not self._extras_off:
            return limit
        if self._steps_since_probe >= EXTRA_PROBE_EVERY:
            self._steps_since_probe = 0
            return limit
        return 1

    @property
    def acceptance(self) -> float:
        """Per-position acceptance: of the proposals examined (up to the first rejection), the share accepted."""
        return (self._accepted + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (self._examined + PRIOR_WEIGHT)

    # ---- costs -------------------------------------------------------------------------
    def _verify(self, proposal_len: int, context: int, overlapped: bool) -> float | None:
        if self.target is not None:
            return self.target.verify_chain.ms(proposal_len + 1, context)
        return self.verify_ms[overlapped].value or self.verify_ms[not overlapped].value

    def _draft_pass(self, context: int, ahead: bool) -> float | None:
        if self.draft is not None:
            return self.draft.draft_step.ms(1, context)
        return self.draft_pass_ms[ahead].value or self.draft_pass_ms[not ahead].value

    # ---- the plan ----------------------------------------------------------------------
    def plan(self, context: int) -> AheadPlan:
        """What to do next step; context: tokens so far."""
        if self.mode == "auto" and self.shared_cores:
            return AheadPlan(False, self.k_default, self.k_default)
        a = self.acceptance
        d_fresh, d_ahead = self._draft_pass(context, False), self._draft_pass(context, True)
        if d_fresh is None or self._verify(1, context, False) is None:  # nothing measured or profiled yet
            return AheadPlan(self.mode == "on", self.k_default, self.k_default)
        top = max(min(self.k_max, PLAN_K_MAX), self.k_default if self.fixed else 0)
        alone = [self._verify(n, context, False) + self.rtt_target for n in range(top + 1)]  # [L] verify ms
        beside = [self._verify(n, context, True) + self.rtt_target for n in range(top + 1)]
        tokens = [expected_tokens(a, n) for n in range(top + 1)]  # [L]
        hit = [a ** (n + 1) for n in range(top + 1)]  # [L] a verdict on L proposals matches the first outcome
        sync = max(tokens[k] / (alone[k] + k * d_fresh + (self.rtt_draft if k else 0.0)) for k in range(top + 1))
        if self.fixed:
            plans = [(self.k_default, self.k_default)]
        else:
            plans = [(k_ahead, k_fresh) for k_ahead in range(1, top + 1) for k_fresh in range(k_ahead + 1)]
        rate, k_ahead, k_fresh = max((self._pipelined_rate(*plan, tokens, hit, beside, d_ahead, d_fresh), *plan)
                                     for plan in plans)
        return AheadPlan(self.mode == "on" or rate > AUTO_MARGIN * sync, k_ahead, k_fresh, rate, sync)

    def _pipelined_rate(self, k_ahead: int, k_fresh: int, tokens: list[float], hit: list[float], beside: list[float],
                        d_ahead: float, d_fresh: float) -> float:
        """Expected tokens per ms of drafting k_ahead ahead and k_fresh after a miss (the module doc)."""
        spec = (k_ahead + 1) * d_ahead + self.rtt_draft
        hit_share = hit[k_fresh] / (1.0 - hit[k_ahead] + hit[k_fresh])
        hit_ms = max(beside[k_ahead], spec)
        fresh_ms = max(beside[k_fresh], spec) + (k_fresh * d_fresh + self.rtt_draft if k_fresh else 0.0)
        return ((hit_share * tokens[k_ahead] + (1 - hit_share) * tokens[k_fresh])
                / (hit_share * hit_ms + (1 - hit_share) * fresh_ms))
