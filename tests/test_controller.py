"""The cost-aware speculation controller on synthetic cost profiles (pure; no models)."""

from __future__ import annotations

import pytest

from specserve.core.controller import (
    PLAIN, ControllerConfig, CostPoint, CostProfile, CostTable, PositionalAcceptance, SpeculationController, StepPlan,
    expected_tokens,
)

KS = (1, 2, 4, 8, 16, 32, 64)


def table(cost, contexts=(128, 1024)) -> CostTable:
    """A cost table of cost(k, context) measured at KS x contexts."""
    return CostTable.of(CostPoint(c, k, cost(k, c)) for c in contexts for k in KS)


def target(cost) -> CostProfile:
    return CostProfile(verify_chain=table(cost), verify_tree=table(cost))


FLAT = target(lambda k, c: 40.0 + 0.05 * k)  # a forward over 64 tokens costs what one does (bf16 + AMX)
STEEP = target(lambda k, c: 40.0 * k)  # every extra token costs a full forward (no matrix units)
MODERATE = target(lambda k, c: 36.0 + 5.7 * (k - 1))  # fp32 on a Xeon: 5 tokens ~1.6x one


def drive(controller: SpeculationController, accept_rate: float, steps: int = 400, context: int = 200,
          remaining: int = 10_000) -> list[StepPlan]:
    """Runs `steps` planned steps against a proposer whose position d is accepted with
    probability accept_rate (deterministically: a fixed pseudo-random pattern)."""
    plans, state = [], 12345
    for _ in range(steps):
        plan = controller.plan(context, remaining)
        plans.append(plan)
        if plan.k:
            accepted = 0
            for _ in range(plan.k):
                state = (1103515245 * state + 12345) % 2**31
                if state / 2**31 >= accept_rate:
                    break
                accepted += 1
            controller.record(plan, plan.k, plan.nodes or plan.k, accepted)
        context += 1
    return plans


def test_cost_table_interpolates_in_tokens_and_context():
    t = CostTable.of([CostPoint(100, 1, 10.0), CostPoint(100, 9, 18.0), CostPoint(500, 1, 20.0), CostPoint(500, 9, 36.0)])
    assert t.ms(1, 100) == 10.0
    assert t.ms(5, 100) == pytest.approx(14.0)
    assert t.ms(17, 100) == pytest.approx(26.0)  # the last slope extends beyond the largest k
    assert t.ms(5, 300) == pytest.approx((14.0 + 28.0) / 2)
    assert t.ms(5, 50) == pytest.approx(14.0) and t.ms(5, 5000) == pytest.approx(28.0)  # clamped in context


def test_positional_acceptance_counts_examined_positions_only():
    record = PositionalAcceptance(decay=1.0)
    record.record(depth=4, accepted=1)  # position 1 accepted, 2 rejected, 3-4 never examined
    record.record(depth=4, accepted=4)
    assert record.tried == [2.0, 2.0, 1.0, 1.0]
    assert record.hit == [2.0, 1.0, 1.0, 1.0]
    rates = record.rates(6, prior=0.5, weight=1.0)
    assert rates[0] == pytest.approx((2 + 0.5) / 3)
    assert rates[4] == pytest.approx(rates[3])  # never tried: inherits the depth above
    assert expected_tokens([1.0, 1.0]) == 3.0 and expected_tokens([0.5, 0.5]) == 1.75


def test_speculation_switches_off_when_verify_cost_grows_steeply():
    controller = SpeculationController(STEEP, None)
    plans = drive(controller, accept_rate=0.7)
    speculative = [p for p in plans if p.k]
    # E[tokens] <= k + 1 while a step costs k + 1 forwards: plain always wins; only probes speculate.
    assert all(p.probe and p.k <= ControllerConfig.probe_k for p in speculative)
    assert len(speculative) <= len(plans) / ControllerConfig.probe_every


def test_probes_back_off_while_they_lose():
    controller = SpeculationController(STEEP, None)
    plans = drive(controller, accept_rate=0.0, steps=300)
    probe_steps = [i for i, p in enumerate(plans) if p.probe]
    gaps = [b - a for a, b in zip(probe_steps, probe_steps[1:])]
    assert gaps[:3] == [16, 32, 64] and set(gaps[3:]) <= {64}  # a probe every 16th, 32nd, 64th step


def test_flat_cost_speculates_deep_when_proposals_are_accepted():
    controller = SpeculationController(FLAT, None)
    plans = drive(controller, accept_rate=0.95)
    assert all(p.k for p in plans)
    assert min(p.k for p in plans[-100:]) >= 8


def test_flat_cost_still_speculates_on_poor_acceptance_but_shorter():
    controller = SpeculationController(FLAT, None)
    plans = drive(controller, accept_rate=0.3)
    assert all(p.k for p in plans[-100:])  # any accepted token is free
    poor = sorted(p.k for p in plans[-100:])[50]
    good = sorted(p.k for p in drive(SpeculationController(FLAT, None), accept_rate=0.95)[-100:])[50]
    assert poor < good


def test_moderate_cost_depends_on_acceptance():
    on = drive(SpeculationController(MODERATE, None), accept_rate=0.8)
    off = drive(SpeculationController(MODERATE, None), accept_rate=0.05)
    assert sum(1 for p in on[-100:] if p.k) == 100
    assert sum(1 for p in off[-100:] if p.k and not p.probe) == 0


def test_the_drafts_cost_and_the_step_overhead_count():
    cheap = SpeculationController(FLAT, None)
    costly_draft = CostProfile(draft_step=table(lambda k, c: 30.0))
    costly = SpeculationController(FLAT, costly_draft)
    assert cheap.plan(200, 1000).k > 0
    drive(cheap, accept_rate=0.4, steps=50)
    drive(costly, accept_rate=0.4, steps=50)
    assert cheap.best(250, 1000)[0].k > 0
    assert costly.best(250, 1000)[0] == PLAIN  # 30 ms per drafted token does not pay at 40% acceptance
    overhead = SpeculationController(FLAT, None, ControllerConfig(draft_overhead_ms=1000.0))
    assert overhead.plan(200, 1000).probe  # a request's first step looks before deciding
    assert overhead.plan(200, 1000) == PLAIN


def test_trees_pick_the_node_budget_the_cost_allows():
    # Trees of 64 nodes cost 3x a forward over one token here; 8 nodes almost nothing.
    profile = target(lambda k, c: 40.0 + (0.5 if k <= 9 else 2.0) * k)
    controller = SpeculationController(profile, None, ControllerConfig(tree_nodes=(8, 64)))
    plans = drive(controller, accept_rate=0.6)
    assert all(p.nodes == 8 for p in plans[-50:])
    assert all(1 <= p.k <= p.nodes for p in plans)  # a tree is never deeper than its nodes


def test_never_proposes_past_the_budget():
    controller = SpeculationController(FLAT, None)
    drive(controller, accept_rate=1.0, steps=20)
    assert controller.plan(200, remaining=3).k == 2
    # The budget's last token is still speculated on (what the step yields past it is cut).
    assert controller.plan(200, remaining=1).k == 1


def test_decisions_depend_only_on_the_record():
    a = drive(SpeculationController(MODERATE, None), accept_rate=0.5)
    b = drive(SpeculationController(MODERATE, None), accept_rate=0.5)
    assert a == b


def test_fixed_length_turns_control_off():
    controller = SpeculationController(STEEP, None, fixed_k=5)
    assert {p.k for p in drive(controller, accept_rate=0.0, steps=30)} == {5}


def test_bigger_trees_get_tried_when_they_cost_little():
    # Trees are nearly free (bf16 with AMX): the biggest budget wins, once tried, when its
    # extra candidates are accepted more often.
    controller = SpeculationController(FLAT, None, ControllerConfig(tree_nodes=(4, 8, 16)))
    for _ in range(20):
        controller.record(StepPlan(4, 4), depth=4, nodes=4, accepted=1)
    assert controller.plan(200, 1000).nodes == 16


def test_dtype_auto_scores_each_dtypes_profile():
    from specserve.dtype_choice import pick, serving_rate

    def profile(ms_1, ms_5, ms_17):
        t = CostTable.of([CostPoint(200, 1, ms_1), CostPoint(200, 5, ms_5), CostPoint(200, 17, ms_17)])
        return CostProfile(verify_chain=t, verify_tree=t)

    # DESIGN.md §3: a Xeon with AMX, where bf16 batches are nearly free.
    xeon = {"float32": serving_rate(profile(36.6, 59.5, 79.3), "target"),
            "bfloat16": serving_rate(profile(41.3, 43.5, 47.8), "target")}
    assert pick(xeon) == "bfloat16"
    # bf16 no faster for one token and slow for batches: float32, exact, wins.
    slow_bf16 = {"float32": serving_rate(profile(36.6, 59.5, 79.3), "target"),
                 "bfloat16": serving_rate(profile(38.0, 115.0, 317.0), "target")}
    assert pick(slow_bf16) == "float32"
    # A draft is scored by its drafting step alone.
    fast = CostProfile(draft_step=CostTable.of([CostPoint(200, 1, 5.0)]))
    assert serving_rate(fast, "draft") == pytest.approx(0.2)


# Flat up to 16 tokens, then every token costs 10 ms (a compute-bound pass past the knee).
KNEE = target(lambda k, c: 40.0 + 0.5 * k if k <= 16 else 48.0 + 10.0 * (k - 16))


def test_speculation_backs_off_as_the_batch_grows_and_returns_as_it_shrinks():
    controller = SpeculationController(KNEE, None)
    alone = drive(controller, 0.7, steps=100)
    assert sum(p.k > 0 for p in alone[-50:]) >= 45  # alone, on the flat part: speculate
    for _ in range(20):
        controller.observe_load(300)  # 300 other tokens per pass: far past the knee
    loaded = drive(controller, 0.7, steps=100)
    assert sum(p.k > 0 and not p.probe for p in loaded[-50:]) == 0
    for _ in range(20):
        controller.observe_load(3)  # the load fell: extra rows are nearly free again
    assert sum(p.k > 0 for p in drive(controller, 0.7, steps=100)[-50:]) >= 45


def test_under_load_on_a_flat_curve_speculation_still_pays():
    controller = SpeculationController(FLAT, None)
    for _ in range(20):
        controller.observe_load(300)
    assert sum(p.k > 0 for p in drive(controller, 0.7, steps=100)[-50:]) >= 45
