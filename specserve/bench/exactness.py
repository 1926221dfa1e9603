"""The exactness matrix: methods x engines x {alone, batched, failover} x dtypes, through the stack.

    python -m specserve.bench.exactness [--engines torch,llama.cpp] [--dtypes float32,bfloat16]
        [--methods autoregressive,prompt_lookup,draft_model,medusa,lookahead] [--modes alone,batched,failover]
        [--prompts 8] [--max-new-tokens 48] [--concurrency 16] [--out DIR]
    (also `specserve bench --exactness ...`)

Every cell is a set of greedy generations compared token for token with two references:
- **plain**: the same engine and dtype's AUTOREGRESSIVE output, the prompt sent alone;
- **transformers** (torch engine only): `generate(do_sample=False)` on the same weights in the
  same dtype, in this process.
Modes: *alone* (one request at a time), *batched* (`--concurrency` streams at once, so continuous
batching puts their rows in shared passes), *failover* (every prompt streamed at once over two
target and two draft replicas; one of each is SIGKILLed once every stream has its first tokens).
A cell reports identical/total and, for outputs that differ, the mean index of the first
differing token. fp32 cells on the torch engine must be all identical; bf16 and quantized
(llama.cpp) cells report how often and where they part. The prompts are the first `--prompts`
of the shared Spec-Bench set (greedy, one user message each); the last line printed is the
matrix as one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("autoregressive", "prompt_lookup", "draft_model", "medusa", "lookahead")
MODES = ("alone", "batched", "failover")


@dataclass
class Cell:
    """One (engine, dtype, mode, method): how many outputs equal each reference."""

    engine: str
    dtype: str
    mode: str
    method: str
    total: int = 0
    equal_plain: int = 0
    equal_transformers: int | None = None  # None: no transformers reference (llama.cpp)
    first_divergence: list[int] = field(default_factory=list)  # vs plain, per differing output
    failovers: int = 0
    served: str = ""  # what the target's stats said served it

    def add(self, tokens: list[int], plain: list[int], reference: list[int] | None) -> None:
        self.total += 1
        if tokens == plain:
            self.equal_plain += 1
        else:
            self.first_divergence.append(first_difference(tokens, plain))
        if reference is not None:
            self.equal_transformers = (self.equal_transformers or 0) + (tokens == reference)

    @property
    def exact(self) -> bool:
        return self.equal_plain == self.total and self.equal_transformers in (None, self.total)


def first_difference(a: list[int], b: list[int]) -> int:
    """The index of the first token where a and b differ (the shorter length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def transformers_greedy(model_spec: str, dtype: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Plain transformers greedy decoding of each prompt (one user message, the chat template)."""
    import torch

    from specserve.runtime.models import load_model, load_tokenizer

    model = load_model(model_spec, dtype).model
    tokenizer = load_tokenizer(model_spec)
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    outputs = []
    for text in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_tensors="pt")["input_ids"]  # [1, P]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)  # [1, P + n]
        tokens = out[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        outputs.append(tokens[:cut])
    return outputs


def _generate(address: str, text: str, method: str, max_new_tokens: int, on_text=None):
    from specserve.client import build_request, connect, generate

    channel, stub = connect(address)
    with channel:
        request = build_request(messages=[{"role": "user", "content": text}], method=method, max_new_tokens=max_new_tokens)
        return generate(stub, request, on_text=on_text, timeout_s=900)


def run_stack(engine: str, dtype: str, methods: list[str], modes: list[str], prompts: list[str], max_new_tokens: int,
              concurrency: int, references: list[list[int]] | None, log_dir: Path | None) -> list[Cell]:
    """Every (mode, method) cell of one engine and dtype, on one stack."""
    from specserve.client import served
    from specserve.launcher import Stack, StackConfig
    from specserve.runtime.models import default_draft_model

    replicas = 2 if "failover" in modes else 1
    config = StackConfig(target_model="smollm2", draft_model=default_draft_model() if "draft_model" in methods else None,
                         dtype=dtype, engine=engine, port=0, redis="off", threads=1, target_replicas=replicas,
                         draft_replicas=replicas, log_dir=log_dir)
    cells: list[Cell] = []
    with Stack(config) as stack:
        plain = [_generate(stack.address, p, "autoregressive", max_new_tokens).token_ids for p in prompts]

        def cell(mode: str, method: str, results) -> Cell:
            c = Cell(engine, dtype, mode, method)
            for i, result in results:
                c.add(result.token_ids, plain[i], references[i] if references else None)
                c.failovers += result.stats.failovers
                c.served = served(result.stats.target)
            print(f"{engine} {dtype} {mode:8s} {method:15s} {c.equal_plain}/{c.total} equal plain"
                  + (f", {c.equal_transformers}/{c.total} equal transformers" if references else "")
                  + (f", first divergence at {c.first_divergence}" if c.first_divergence else ""), flush=True)
            return c

        for method in methods:
            if "alone" in modes:
                cells.append(cell("alone", method, [(i, _generate(stack.address, p, method, max_new_tokens))
                                                    for i, p in enumerate(prompts)]))
            if "batched" in modes:
                order = [i % len(prompts) for i in range(max(concurrency, len(prompts)))]
                with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
                    futures = [pool.submit(_generate, stack.address, prompts[i], method, max_new_tokens) for i in order]
                    cells.append(cell("batched", method, [(i, f.result()) for i, f in zip(order, futures)]))
        if "failover" in modes:
            cells.extend(cell("failover", method, results) for method, results in
                         _failover_round(stack, methods, prompts, max_new_tokens).items())
    return cells


def _failover_round(stack, methods: list[str], prompts: list[str], max_new_tokens: int) -> dict[str, list]:
    """Every (method, prompt) streamed at once; target-0 and draft-0 (when there is one) are
    SIGKILLed once every stream has produced text. {method: [(prompt index, Generation)]}."""
    jobs = [(method, i) for method in methods for i in range(len(prompts))]
    seen = [0] * len(jobs)

    def run(j: int):
        method, i = jobs[j]

        def on_text(_text, j=j):
            seen[j] += 1
        return _generate(stack.address, prompts[i], method, max_new_tokens, on_text)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run, j) for j in range(len(jobs))]
        deadline = time.monotonic() + 600
        while not all(seen) and time.monotonic() < deadline and not any(f.done() for f in futures):
            time.sleep(0.005)
        victims = ["target-0"] + (["draft-0"] if stack.draft_addresses else [])
        for name in victims:
            stack.process(name).send_signal(signal.SIGKILL)
        results: dict[str, list] = {m: [] for m in methods}
        for (method, i), future in zip(jobs, futures):
            results[method].append((i, future.result()))
    return results


def markdown(cells: list[Cell]) -> str:
    """The matrix as a table: a row per method, a column per (engine dtype mode)."""
    columns = list(dict.fromkeys((c.engine, c.dtype, c.mode) for c in cells))
    by_key = {(c.engine, c.dtype, c.mode, c.method): c for c in cells}
    lines = ["| method | " + " | ".join(f"{e} {d} {m}" for e, d, m in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in dict.fromkeys(c.method for c in cells):
        row = []
        for e, d, m in columns:
            c = by_key.get((e, d, m, method))
            if c is None:
                row.append("–")
                continue
            text = f"{c.equal_plain}/{c.total}"
            if c.equal_transformers is not None:
                text += f" (hf {c.equal_transformers}/{c.total})"
            if c.first_divergence:
                text += f", 1st diff @{sum(c.first_divergence) / len(c.first_divergence):.0f}"
            row.append(text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines", default="torch,llama.cpp")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="the torch engine's; llama.cpp runs its GGUF types")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--prompts", type=int, default=8, help="the first N prompts of the Spec-Bench set")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16, help="streams at once in the batched mode")
    parser.add_argument("--out", type=Path, default=None, help="write exactness.json and exactness.md here")


def run(args: argparse.Namespace) -> list[Cell]:
    from specserve.bench.batching import cpu_description
    from specserve.bench.prompts import DEFAULT_PROMPT_DIR, load_prompts

    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    unknown = (set(methods) - set(METHODS)) | (set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"exactness: unknown method or mode: {', '.join(sorted(unknown))}")
    prompts = [p.text for p in load_prompts([DEFAULT_PROMPT_DIR / "spec_bench.jsonl"])[: args.prompts]]
    print(f"CPU: {cpu_description()}; {len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy", flush=True)
    cells: list[Cell] = []
    for engine in [e for e in args.engines.split(",") if e]:
        for dtype in ([d for d in args.dtypes.split(",") if d] if engine == "torch" else ["auto"]):
            references = transformers_greedy("smollm2", dtype, prompts, args.max_new_tokens) if engine == "torch" else None
            log_dir = args.out / "logs" / f"{engine}-{dtype}" if args.out else None
            cells += run_stack(engine, dtype, methods, modes, prompts, args.max_new_tokens, args.concurrency, references,
                               log_dir)
    table = markdown(cells)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "exactness.md").write_text(table + "\n")
        (args.out / "exactness.json").write_text(json.dumps([asdict(c) for c in cells], indent=1))
    print(json.dumps({f"{c.engine} {c.dtype} {c.mode} {c.method}": [c.equal_plain, c.total, c.equal_transformers]
                      for c in cells}))
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specserve.bench.exactness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    cells = run(parser.parse_args(argv))
    fp32_torch = [c for c in cells if c.engine == "torch" and c.dtype == "float32"]
    return 0 if all(c.exact for c in fp32_torch) else 1


if __name__ == "__main__":
    sys.exit(main())
