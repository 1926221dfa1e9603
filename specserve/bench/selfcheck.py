"""Quick checks of the benchmark's pure parts, run by hand: `python -m specserve.bench.selfcheck`.

(Candidates for tests/test_bench.py; no models, no network, well under a second.)
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from specserve.bench import aggregate, simulated
from specserve.bench.prompts import balanced_subset, load_prompts
from specserve.bench.records import RunRecord


def check_prompts() -> None:
    records = [{"question_id": 1, "category": "a", "turns": ["first", "second"]},
               {"question_id": 2, "category": "a", "turns": ["x"]},
               {"question_id": 3, "category": "b", "turns": ["y"]},
               {"task_id": "HumanEval/0", "prompt": "def f():"},
               {"question": "2+2?", "answer": "#### 4"},
               {"question_id": 9, "category": "a", "turns": ["first"]}]  # duplicate text: dropped
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mixed.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        prompts = load_prompts([path])
    assert [p.text for p in prompts] == ["first", "x", "y", "def f():", "2+2?"], prompts
    assert [p.category for p in prompts] == ["a", "a", "b", "humaneval", "gsm8k"]
    subset = balanced_subset(prompts, 4)
    assert [p.category for p in subset] == ["a", "b", "gsm8k", "humaneval"], subset  # one per category first
    assert balanced_subset(prompts, 5)[-1].text == "x"  # then the second round
    assert balanced_subset(prompts, 4) == subset  # deterministic


def check_aggregate() -> None:
    assert aggregate.median([3.0, 1.0, 2.0]) == 2.0 and aggregate.median([]) is None
    assert math.isclose(aggregate.geometric_mean([2.0, 8.0]), 4.0)
    assert math.isclose(aggregate.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50), 3.0)
    assert aggregate.exact_match_rate({"p": [1, 2], "q": [3]}, {"p": [1, 2], "q": [4], "r": [5]}) == 0.5

    def record(mode, method, prompt, wall, tokens, steps, proposed=0, accepted=0):
        return RunRecord(mode, method, prompt, "c", tokens, wall, steps, proposed, accepted)

    records = [record("distributed", "autoregressive", "p", 4.0, [1, 2, 3, 4], 3),
               record("distributed", "prompt_lookup", "p", 1.0, [1, 2, 3, 4], 1, 3, 3),
               record("distributed", "autoregressive", "q", 2.0, [5, 6], 1),
               record("distributed", "prompt_lookup", "q", 2.0, [5, 7], 2, 2, 0)]
    rows = {(r["method"], r["category"]): r for r in aggregate.summarize(records)}
    lookup = rows[("prompt_lookup", aggregate.ALL)]
    assert math.isclose(lookup["speedup"], 2.5) and math.isclose(lookup["speedup_geomean"], 2.0)
    assert math.isclose(lookup["tau"], 6 / 3) and math.isclose(lookup["acceptance_rate"], 3 / 5)
    assert lookup["exact_match_rate"] == 0.5 and lookup["n"] == 2
    overhead = aggregate.step_overhead([(10.0, 9.0), (20.0, 10.0)])
    assert math.isclose(overhead["overhead_ms_p50"], 5.5)


def check_simulated() -> None:
    assert simulated.parse_spec("sim:role=draft,step_ms=2,accept=0.5") == simulated.SimSpec("draft", 2.0, 0.5)
    for bad in ("sim:role=oracle", "sim:accept=2", "sim:speed=1", "smollm2"):
        try:
            simulated.parse_spec(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} should be rejected")
    for accept in (0.0, 0.3, 0.8, 1.0):
        measured = simulated.empirical_acceptance(accept, trials=20000)
        assert abs(measured - accept) < 0.015, (accept, measured)
    tokens = range(0, simulated.VOCAB_SIZE, 97)
    assert all(simulated.next_token(t) not in simulated.EOS_TOKEN_IDS for t in tokens)
    assert all(simulated.draft_token(p, t, 0.0) != simulated.next_token(t) for p, t in enumerate(tokens))
    model = simulated.load_simulated("sim:role=target", None).model
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True, logits_to_keep=2).logits
    assert logits.shape == (1, 2, simulated.VOCAB_SIZE)  # [1, m, V]
    assert logits[0].argmax(-1).tolist() == [simulated.next_token(6), simulated.next_token(7)]
    assert cache.get_seq_length() == 3
    cache.crop(-1)
    assert cache.get_seq_length() == 2


def main() -> None:
    for check in (check_prompts, check_aggregate, check_simulated):
        check()
        print(f"ok  {check.__name__}")


if __name__ == "__main__":
    main()
