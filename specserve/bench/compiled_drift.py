"""How far the compiled engine's greedy output is from plain transformers float32 greedy decoding.

For a few chat prompts, decodes N tokens greedily with transformers' own `generate` (float32,
the reference) and with each engine setting through its plain decoding (one token per
forward), and prints the first position where each differs from the reference (N: the
same for all N tokens). The prompts are the first ones of the shared Spec-Bench file
(`--prompt-file`), or built-in questions when it is absent.

    python -m specserve.bench.compiled_drift --settings compiled:float32,compiled:bfloat16,compiled:int8,torch:bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from specserve.bench.prompts import DEFAULT_PROMPT_DIR, load_prompts
from specserve.loading import load_model
from specserve.runtime.models import load_tokenizer, resolve_model_dir
from specserve.runtime.profile import machine_facts

BUILT_IN = ["What are three tips for staying productive when working from home?",
            "Explain in two sentences why the sky is blue.",
            "Write a Python function that returns the n-th Fibonacci number."]


def plain_greedy(engine, prompt: list[int], n: int) -> list[int]:
    """n tokens, one forward per token, argmax each time."""
    session = engine.new_session()
    out = [int(session.extend(prompt)[0].argmax())]
    while len(out) < n:
        out.append(int(session.extend(out[-1:])[0].argmax()))
    getattr(session, "close", lambda: None)()
    return out


def reference_greedy(spec: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(spec), dtype=torch.float32, use_safetensors=True).eval()
    outs = []
    with torch.inference_mode():
        for prompt in prompts:
            generated = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                       pad_token_id=model.config.eos_token_id)  # [1, len + n]
            outs.append(generated[0, len(prompt):].tolist())
    return outs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--settings", default="compiled:float32,compiled:bfloat16,compiled:int8",
                    help="comma-separated engine:dtype pairs")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--prompt-file", type=Path, default=DEFAULT_PROMPT_DIR / "spec_bench.jsonl",
                    help="JSON Lines prompts (specserve.bench.prompts); built-in questions when absent")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tokenizer = load_tokenizer(a.model)
    path = a.prompt_file
    texts = [p.text for p in load_prompts([path])[: a.prompts]] if path.is_file() else BUILT_IN[: a.prompts]
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
               for t in texts]
    prompts = [list(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded]
    print(f"# {machine_facts()['cpu']}, {a.threads} threads; first position differing from transformers float32 greedy "
          f"({a.tokens} = none in {a.tokens} tokens)")
    reference = reference_greedy(a.model, prompts, a.tokens)
    print("| engine | dtype | " + " | ".join(f"prompt {i}" for i in range(len(prompts))) + " |")
    print("|---|---|" + "---|" * len(prompts))
    for setting in a.settings.split(","):
        engine_name, dtype = setting.split(":")
        engine = load_model(a.model, dtype, engine=engine_name)
        cells = [str(first_difference(plain_greedy(engine, p, a.tokens), ref)) for p, ref in zip(prompts, reference)]
        print(f"| {engine_name} | {dtype} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
