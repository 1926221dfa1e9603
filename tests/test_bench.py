"""The benchmark's pure parts: prompt shapes, aggregation, and the simulated models."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from specserve.bench.aggregate import geometric_mean, percentile, step_overhead, summarize
from specserve.bench.prompts import balanced_subset, load_prompts, parse_record
from specserve.bench.records import RunRecord
from specserve.bench.simulated import empirical_acceptance, expected_accepted_length, load_simulated, next_token
from specserve.core.adaptive import SpeculationLength
from specserve.core.sampling import SamplingConfig
from specserve.core.speculate import DecodeRequest, decode
from specserve.runtime.local import LocalDraftProposer, LocalTargetSession


def test_every_record_shape_is_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
        {"task_id": "HumanEval/0", "prompt": "def f():\n"},
        {"question": "What is 2 + 2?", "answer": "4"},
        {"question_id": 82, "category": "writing", "turns": ["Write a poem."]},  # a duplicate text
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    prompts = load_prompts([path])
    assert [(p.prompt_id, p.category, p.text) for p in prompts] == [
        ("mixed:81", "writing", "Write a poem."),
        ("mixed:HumanEval/0", "humaneval", "def f():\n"),
        ("mixed:3", "gsm8k", "What is 2 + 2?"),
    ]
    with pytest.raises(ValueError):
        parse_record({"text": "?"}, "x", 1)


def test_balanced_subset_round_robins_over_categories():
    prompts = [parse_record({"question_id": i, "category": c, "turns": [f"{c}{i}"]}, "s", i)
               for i, c in enumerate(["b", "b", "b", "a", "c"])]
    assert [p.text for p in balanced_subset(prompts, 4)] == ["a3", "b0", "c4", "b1"]
    assert len(balanced_subset(prompts, None)) == 5


def test_means_and_percentiles():
    assert geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    overhead = step_overhead([(10.0, 9.0), (12.0, 9.0), (11.0, 9.0)])
    assert overhead["overhead_ms_p50"] == pytest.approx(2.0)
    assert overhead["overhead_ms_p99"] == pytest.approx(2.98)


def test_summary_speedups_tau_and_exact_match():
    def record(method, prompt, wall, tokens, steps, proposed=None, accepted=None):
        return RunRecord("distributed", method, prompt, "cat", tokens, wall, steps, proposed, accepted)

    records = [
        record("autoregressive", "p1", 4.0, [1, 2, 3, 4], 3),
        record("autoregressive", "p2", 9.0, [5, 6, 7], 2),
        record("prompt_lookup", "p1", 1.0, [1, 2, 3, 4], 1, 3, 3),
        record("prompt_lookup", "p2", 9.0, [5, 6, 8], 2, 4, 1),
    ]
    rows = {(r["method"], r["category"]): r for r in summarize(records)}
    lookup = rows[("prompt_lookup", "all")]
    assert lookup["n"] == 2
    assert lookup["speedup"] == pytest.approx(2.5)  # median of 4x and 1x
    assert lookup["speedup_geomean"] == pytest.approx(2.0)
    assert lookup["tau"] == pytest.approx(7 / 3)
    assert lookup["acceptance_rate"] == pytest.approx(4 / 7)
    assert lookup["exact_match_rate"] == pytest.approx(0.5)
    assert rows[("autoregressive", "cat")]["speedup"] == pytest.approx(1.0)


def test_speedup_is_a_ratio_of_tokens_per_second_not_of_wall_times():
    # An output that ends earlier (bf16 can flip a near-tie into EOS) takes less time
    # without being faster: 2 tokens in 3 s against 6 tokens in 9 s is no speedup.
    records = [RunRecord("distributed", "autoregressive", "p", "cat", [1] * 6, 9.0, 6),
               RunRecord("distributed", "prompt_lookup", "p", "cat", [1] * 2, 3.0, 2, 1, 0)]
    rows = {(r["method"], r["category"]): r for r in summarize(records)}
    assert rows[("prompt_lookup", "all")]["speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize("accept", [0.0, 0.5, 0.8, 1.0])
def test_simulated_draft_is_accepted_at_its_rate(accept):
    assert empirical_acceptance(accept, trials=4000) == pytest.approx(accept, abs=0.03)


def test_simulated_models_run_the_real_decode_loop():
    target = load_simulated("sim:role=target,step_ms=0", None)
    draft = load_simulated("sim:role=draft,step_ms=0,accept=0.7", None)
    request = DecodeRequest([100, 200], SamplingConfig(max_new_tokens=400), 0, target.eos_token_ids,
                            target.max_context_tokens, SpeculationLength(4, fixed=True))

    async def run():
        chunks = decode(LocalTargetSession(target), LocalDraftProposer(draft), request)
        return [token async for chunk in chunks for token in chunk.tokens]

    tokens = asyncio.run(run())
    assert len(tokens) == 400
    # The simulated target's greedy choice is a fixed function of the previous token.
    assert all(b == next_token(a) for a, b in zip([200] + tokens, tokens))
    tau = request.stats.mean_accepted_length
    assert math.isclose(tau, expected_accepted_length(0.7, 4), rel_tol=0.12)
