"""Benchmark prompts: reading the record shapes of Spec-Bench, MT-Bench, HumanEval and GSM8K.

Record shapes (JSON Lines, one record a line):
- Spec-Bench / MT-Bench: {"question_id", "category", "turns": [...]}: the first turn is the prompt;
- HumanEval: {"task_id", "prompt"}: category "humaneval";
- GSM8K: {"question"}: category "gsm8k".
Every prompt is sent as one user chat message (the chat template applies).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# The shared prompt sets sit beside the repository: <repo>/../shared/bench.
DEFAULT_PROMPT_DIR = Path(__file__).resolve().parents[3] / "shared" / "bench"


@dataclass(frozen=True)
class BenchPrompt:
    prompt_id: str  # "<file stem>:<question id or line number>"
    category: str
    text: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def parse_record(record: dict, source: str, line_number: int) -> BenchPrompt:
    """One JSONL record as a prompt; raises ValueError for a shape it does not know."""
    if "turns" in record:
        turns = record["turns"]
        if not turns or not isinstance(turns[0], str):
            raise ValueError(f"{source}:{line_number}: 'turns' holds no text")
        qid = record.get("question_id", line_number)
        return BenchPrompt(f"{source}:{qid}", str(record.get("category", source)), turns[0])
    if "prompt" in record:
        qid = record.get("task_id", line_number)
        return BenchPrompt(f"{source}:{qid}", str(record.get("category", "humaneval")), record["prompt"])
    if "question" in record:
        return BenchPrompt(f"{source}:{line_number}", str(record.get("category", "gsm8k")), record["question"])
    raise ValueError(f"{source}:{line_number}: a record needs 'turns', 'prompt' or 'question' (keys: {sorted(record)})")


def load_prompts(paths: list[Path]) -> list[BenchPrompt]:
    """Every prompt of the files, in file order; a text seen before (e.g. MT-Bench inside
    Spec-Bench) is kept once, under its first file."""
    prompts: list[BenchPrompt] = []
    seen: set[str] = set()
    for path in paths:
        with open(path, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                prompt = parse_record(json.loads(line), Path(path).stem, line_number)
                if prompt.text not in seen:
                    seen.add(prompt.text)
                    prompts.append(prompt)
    return prompts


def balanced_subset(prompts: list[BenchPrompt], limit: int | None) -> list[BenchPrompt]:
    """`limit` prompts in total, spread over the categories as evenly as possible.

    Deterministic: categories are visited in sorted order, round-robin, each giving its
    next prompt in file order; a category that runs out drops from the rotation. So
    --limit 14 on 14 categories is one prompt per category, --limit 28 two, and so on.
    The result is ordered by round (all first picks, then all second picks, ...), so a
    run stopped early has still covered every category. None: every prompt.
    """
    if limit is None:
        return list(prompts)
    by_category: dict[str, list[BenchPrompt]] = defaultdict(list)
    for prompt in prompts:
        by_category[prompt.category].append(prompt)
    queues = [list(by_category[c]) for c in sorted(by_category)]
    chosen: list[BenchPrompt] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def default_prompt_files() -> list[Path]:
    """Spec-Bench (which holds MT-Bench) and HumanEval; GSM8K is Spec-Bench's math_reasoning already."""
    return [DEFAULT_PROMPT_DIR / "spec_bench.jsonl", DEFAULT_PROMPT_DIR / "humaneval.jsonl"]
