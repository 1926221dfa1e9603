"""Cost-aware speculation control: each step, speculate as much as pays, or not at all.

A step that proposes a chain of K tokens costs the target a forward over K + 1
tokens, the draft K drafting steps, plus the step's fixed overhead; it yields
1 + E[accepted] tokens. A plain step costs a forward over 1 token and yields 1.
`SpeculationController` picks, each step, the chain length K (or a tree's depth and
node budget) with the most expected tokens per millisecond, from

- the measured `CostProfile`s of the target and the draft (runtime.profile measures
  them at service start-up), and
- the request's own acceptance record per depth (Sequoia's positional acceptance):
  of the proposals whose position d was examined (positions 1..d-1 accepted), the
  share accepted at d, with exponentially decaying counts so it follows the text.

When no speculation beats a plain step it decodes plainly and probes now and then
with a short proposal to refresh the record. Decisions depend only on the profile,
the request's acceptance record and its length, never on clocks read during the
request, so a seeded sampled request is reproducible on a given server.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass


LOAD_DECAY = 0.5  # per observed step: how fast the controller follows the target's load


@dataclass(frozen=True)
class CostPoint:
    context_tokens: int  # tokens in the KV cache before the forward
    new_tokens: int  # tokens the forward adds (a chain, a tree's nodes, a tree level)
    ms: float  # wall time (the best of a few runs)
    bytes_read: float = 0.0  # weights + KV cache the forward reads at least (0: unknown)
    flops: float = 0.0  # floating-point operations of the forward (0: unknown)


@dataclass(frozen=True)
class CostTable:
    """Measured points (context, new tokens) -> ms; `ms` interpolates linearly in new tokens
    (extrapolating the last slope), then in context (clamped to the measured range)."""

    points: tuple[CostPoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a cost table needs at least one measured point")

    @staticmethod
    def of(points: Iterable[CostPoint]) -> CostTable:
        return CostTable(tuple(sorted(points, key=lambda p: (p.context_tokens, p.new_tokens))))

    def contexts(self) -> list[int]:
        return sorted({p.context_tokens for p in self.points})

    def ms(self, new_tokens: int, context_tokens: int) -> float:
        contexts = self.contexts()
        i = bisect.bisect_left(contexts, context_tokens)
        if i == 0 or contexts[min(i, len(contexts) - 1)] == context_tokens:
            return self._at_context(contexts[min(i, len(contexts) - 1)], new_tokens)
        if i == len(contexts):
            return self._at_context(contexts[-1], new_tokens)
        low, high = contexts[i - 1], contexts[i]
        weight = (context_tokens - low) / (high - low)
        return (1 - weight) * self._at_context(low, new_tokens) + weight * self._at_context(high, new_tokens)

    def _at_context(self, context: int, new_tokens: int) -> float:
        row = [(p.new_tokens, p.ms) for p in self.points if p.context_tokens == context]
        if len(row) == 1:
            return row[0][1]
        ks = [k for k, _ in row]
        i = min(max(bisect.bisect_left(ks, new_tokens), 1), len(row) - 1)
        (k0, m0), (k1, m1) = row[i - 1], row[i]
        return max(m0 + (m1 - m0) * (new_tokens - k0) / (k1 - k0), 0.0)


@dataclass(frozen=True)
class CostProfile:
    """What a model service measured. The target fills the verify tables; a draft the
    drafting ones (one drafting step = one token; a tree level = `new_tokens` nodes)."""

    verify_chain: CostTable | None = None
    verify_tree: CostTable | None = None
    draft_step: CostTable | None = None
    draft_tree_level: CostTable | None = None


@dataclass(frozen=True)
class StepPlan:
    k: int  # chain length or tree depth to propose; 0: a plain step
    nodes: int = 0  # a tree's node budget; 0: a chain
    probe: bool = False  # proposed to refresh the acceptance record, not because it pays


PLAIN = StepPlan(0)


class PositionalAcceptance:
    """Per depth d (1-based): decayed counts of proposals whose position d was examined,
    and of those accepted at d. `rates` shrinks each depth's rate toward the one above it
    (toward `prior` at depth 1), so depths never tried inherit from shallower ones."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.tried: list[float] = []  # [d-1]: position d examined
        self.hit: list[float] = []  # [d-1]: position d accepted
        self._width_sum = 0.0  # decayed sum and count of the candidates per level of the proposals
        self._width_count = 0.0

    @property
    def width(self) -> float:
        """Mean candidates per level of the recorded proposals (1 for chains)."""
        return self._width_sum / self._width_count if self._width_count else 1.0

    def record(self, depth: int, accepted: int, width: float = 1.0) -> None:
        self.tried = [t * self.decay for t in self.tried]
        self.hit = [h * self.decay for h in self.hit]
        self._width_sum = self._width_sum * self.decay + width
        self._width_count = self._width_count * self.decay + 1.0
        examined = min(depth, accepted + 1)  # positions 1..accepted accepted, accepted+1 rejected (if proposed)
        while len(self.tried) < examined:
            self.tried.append(0.0)
            self.hit.append(0.0)
        for d in range(examined):
            self.tried[d] += 1.0
            self.hit[d] += 1.0 if d < accepted else 0.0

    def rates(self, depth: int, prior: float, weight: float, parent: list[float] | None = None) -> list[float]:
        """Conditional acceptance of positions 1..depth. `parent`: another record's rates to
        shrink toward instead (a tree budget never tried borrows from the others)."""
        out: list[float] = []
        above = prior
        for d in range(depth):
            center = parent[d] if parent is not None and d < len(parent) else above
            tried = self.tried[d] if d < len(self.tried) else 0.0
            hit = self.hit[d] if d < len(self.hit) else 0.0
            above = (hit + weight * center) / (tried + weight)
            out.append(above)
        return out


def expected_tokens(rates: list[float]) -> float:
    """Tokens one verification yields: 1 (the target's own) + expected accepted prefix."""
    total, reach = 1.0, 1.0
    for rate in rates:
        reach *= rate
        total += reach
    return total


def proposal_cap(remaining: int) -> int:
    """The longest chain (or deepest tree) a step may propose with `remaining` tokens of budget
    left: remaining - 1, since a step yields up to k + 1 tokens, but at least 1, so the last
    token is speculated on too (a sampled request's second token then goes through the
    rejection sampler; what a step yields past the budget is cut)."""
    return max(remaining - 1, 1)


@dataclass
class ControllerConfig:
    k_max: int = 16  # longest chain / deepest tree
    tree_nodes: tuple[int, ...] = ()  # node budgets to choose from when the proposer drafts trees; () = chains
    tree_width: int = 4  # nodes a draft tree level expands (its drafting cost per level)
    step_overhead_ms: float = 0.0  # every step: the loop, the network round trip to the target
    draft_overhead_ms: float = 0.0  # a speculative step's extra: the round trip to a remote draft
    prior: float = 0.6  # acceptance assumed before the request shows any
    prior_weight: float = 1.0  # in proposals: how fast the record overrides the prior
    decay: float = 0.9  # per recorded step: older proposals count less
    probe_every: int = 8  # plain steps between probes while plain decoding wins ...
    probe_every_max: int = 64  # ... doubling while probes keep losing, up to this
    probe_k: int = 2  # a probe's chain length / tree depth


class SpeculationController:
    """Plans each step (`plan`) and learns from its outcome (`record`); see the module doc.

    `draft` is None for a proposer that costs nothing to ask (prompt lookup).
    `fixed_k` > 0 turns control off: every step proposes fixed_k (a request's fixed_length).
    """

    def __init__(self, target: CostProfile, draft: CostProfile | None, config: ControllerConfig | None = None,
                 fixed_k: int = 0):
        if target.verify_chain is None:
            raise ValueError("the target's cost profile has no chain verify costs")
        self.target = target
        self.draft = draft
        self.config = config or ControllerConfig()
        self.fixed_k = fixed_k
        self.chain_record = PositionalAcceptance(self.config.decay)
        self.tree_records = {n: PositionalAcceptance(self.config.decay) for n in self.config.tree_nodes}
        self._plain_run = 0  # plain steps since the last speculative one
        # A request's first step probes even where the profile and prior favour plain decoding:
        # a guess is no record, and a sampled request's draft then always meets the sampler.
        self._first = True
        self._probe_every = self.config.probe_every
        self.load_tokens = 0.0  # other sessions' tokens in the target's forward passes lately

    def observe_load(self, other_tokens: int) -> None:
        """Other sessions' tokens in the forward pass the last verify rode in (continuous
        batching). Under load, a step's verify rows cost what they add to a shared pass, so
        speculation backs off as the batch grows and returns as it shrinks (see `rate`). Only for requests
        whose output does not depend on K (greedy): a seeded sampled request's K sequence
        must not depend on what else the server runs."""
        self.load_tokens = LOAD_DECAY * self.load_tokens + (1 - LOAD_DECAY) * max(other_tokens, 0)

    # ---- costs -------------------------------------------------------------------------
    def step_ms(self, plan: StepPlan, context: int) -> float:
        """Expected wall ms of a step: target verify + drafting + overheads."""
        c = self.config
        if plan.k == 0:
            return self._verify_ms(self.target.verify_chain, 1, context) + c.step_overhead_ms
        if plan.nodes:
            verify = self._verify_ms(self.target.verify_tree or self.target.verify_chain, plan.nodes + 1, context)
        else:
            verify = self._verify_ms(self.target.verify_chain, plan.k + 1, context)
        return verify + self._draft_ms(plan, context) + c.step_overhead_ms + c.draft_overhead_ms

    def _verify_ms(self, table: CostTable, tokens: int, context: int) -> float:
        """A verify of `tokens` rows, in a pass that also carries `load_tokens` of other sessions."""
        return table.ms(self.load_tokens + tokens, context)

    def _draft_ms(self, plan: StepPlan, context: int) -> float:
        if self.draft is None or self.draft.draft_step is None:
            return 0.0
        step = self.draft.draft_step.ms(1, context)
        if not plan.nodes:
            return step * plan.k
        level = self.draft.draft_tree_level
        per_level = level.ms(self.config.tree_width, context) if level is not None else step * self.config.tree_width
        return step + per_level * (plan.k - 1)

    # ---- acceptance --------------------------------------------------------------------
    def expected_tokens(self, plan: StepPlan) -> float:
        c = self.config
        if plan.k == 0:
            return 1.0
        if not plan.nodes:
            return expected_tokens(self.chain_record.rates(plan.k, c.prior, c.prior_weight))
        # A budget's prior: each of its ~nodes/depth candidates per level accepted independently
        # with the per-candidate rate all tree steps show. It is optimistic for bigger trees
        # (a draft's candidates are correlated), so a budget worth trying gets tried, and its
        # own record then takes over.
        width = max(plan.nodes / plan.k, 1.0)
        prior = [1.0 - (1.0 - q) ** width for q in self._per_candidate_rates(plan.k)]
        return expected_tokens(self.tree_records[plan.nodes].rates(plan.k, c.prior, c.prior_weight, parent=prior))

    def _per_candidate_rates(self, depth: int) -> list[float]:
        """Per depth: the acceptance of one candidate, from every tree budget's record (a level
        of w candidates accepted at rate r means 1 - (1 - r)^(1/w) per candidate), weighted by
        how often each examined that depth; a depth no tree reached inherits the one above."""
        c = self.config
        out, above = [], c.prior
        for d in range(depth):
            weighted = total = 0.0
            for record in self.tree_records.values():
                if d < len(record.tried) and record.tried[d] > 0:
                    rate = (record.hit[d] + c.prior_weight * above) / (record.tried[d] + c.prior_weight)
                    weighted += record.tried[d] * (1.0 - (1.0 - rate) ** (1.0 / record.width))
                    total += record.tried[d]
            above = weighted / total if total else above
            out.append(above)
        return out

    # ---- decisions ---------------------------------------------------------------------
    def candidates(self, remaining: int) -> list[StepPlan]:
        """Every speculative plan within the budget (a step yields at most k + 1 tokens)."""
        top = min(self.config.k_max, proposal_cap(remaining))
        if self.config.tree_nodes:
            return [StepPlan(k, n) for n in self.config.tree_nodes for k in range(1, min(top, n) + 1)]
        return [StepPlan(k) for k in range(1, top + 1)]

    def rate(self, plan: StepPlan, context: int) -> float:
        """Expected tokens per ms of the passes this request rides in: its own tokens plus, under
        load, the other sessions' (counted as one token per row, as plain decoding yields). Alone
        this is the request's own rate; in a big batch on a cost curve that has turned linear,
        extra verify rows slow every session more than they yield, and plain decoding wins."""
        return (self.load_tokens + self.expected_tokens(plan)) / max(self.step_ms(plan, context), 1e-6)

    def best(self, context: int, remaining: int) -> tuple[StepPlan, StepPlan | None]:
        """(the plan with the most expected tokens per ms, the best speculative plan or None)."""
        speculative = max(self.candidates(remaining), key=lambda p: (self.rate(p, context), -p.k, -p.nodes), default=None)
        if speculative is not None and self.rate(speculative, context) > self.rate(PLAIN, context):
            return speculative, speculative
        return PLAIN, speculative

    def plan(self, context: int, remaining: int) -> StepPlan:
        """What to propose next step. context: tokens so far (prompt + output); remaining: token budget."""
        if self.fixed_k:
            k = min(self.fixed_k, proposal_cap(remaining))
            nodes = max(self.config.tree_nodes, default=0)
            return StepPlan(k, nodes if nodes >= k else 0) if k > 0 else PLAIN
        choice, speculative = self.best(context, remaining)
        first, self._first = self._first, False
        if choice.k:
            self._plain_run = 0
            self._probe_every = self.config.probe_every
            return choice
        self._plain_run += 1
        if speculative is None or (self._plain_run < self._probe_every and not first):
            return PLAIN
        # Plain decoding wins on the record so far; look again, cheaply, every so often.
        self._plain_run = 0
        self._probe_every = min(2 * self._probe_every, self.config.probe_every_max)
        k = min(speculative.k, self.config.probe_k)
        return StepPlan(k, speculative.nodes, probe=True)

    def record(self, plan: StepPlan, depth: int, nodes: int, accepted: int) -> None:
        """The outcome of a step: the proposal's depth (chain length) and node count as sent,
        and how many tokens the target accepted. Steps that proposed nothing teach nothing."""
        if self.fixed_k or depth == 0:
            return
        if plan.nodes and plan.nodes in self.tree_records:
            self.tree_records[plan.nodes].record(depth, accepted, width=max(nodes / depth, 1.0))
        else:
            self.chain_record.record(depth, accepted)


def speculation_policy(target: CostProfile | None, draft: CostProfile | None, *, k: int, k_max: int, fixed: bool,
                       tree_nodes: int = 0, tree_width: int = 4, step_overhead_ms: float = 0.0,
                       draft_overhead_ms: float = 0.0):
    """The policy a request's decoding loop follows: the cost-aware controller when the target
    reported a profile, else the cost-blind adaptive K (a service that measured nothing, e.g.
    a simulated model). tree_nodes > 0: the proposer drafts trees of at most that many nodes,
    and the controller also chooses among half and a quarter of it."""
    from specserve.core.adaptive import SpeculationLength

    if target is None or target.verify_chain is None:
        return SpeculationLength(k, k_max=k_max, fixed=fixed)
    budgets = tuple(sorted({n for n in (tree_nodes // 4, tree_nodes // 2, tree_nodes) if n >= 2})) if tree_nodes else ()
    config = ControllerConfig(k_max=k_max, tree_nodes=budgets, tree_width=tree_width, step_overhead_ms=step_overhead_ms,
                              draft_overhead_ms=draft_overhead_ms)
    return SpeculationController(target, draft, config, fixed_k=k if fixed else 0)
