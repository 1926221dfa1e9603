"""Sampled output through the stack, with the draft actually proposing: at temperature 1 the
second token of DRAFT_MODEL's output follows the target's own distribution (a randomized
probability integral transform, then a Kolmogorov-Smirnov test), and a seed reproduces it."""

from __future__ import annotations

import torch

from specserve.client import build_request, connect, generate
from specserve.core.sampling import SamplingConfig, warp

PROMPT = "Once upon a time"
SAMPLES = 400


def _second_token_pit(target, prompt_ids: list[int], pairs: list[tuple[int, int]], seed: int = 0) -> list[float]:
    """For each (first, second) token pair, with tokens ordered from the likeliest down under
    the target's p(. | prompt, first): the mass before `second` plus u * p(second), u uniform.
    Uniform on [0, 1) exactly when second ~ p; a sampler that keeps too many draft tokens puts
    its samples in p's tail (high values), one that rejects too many favours p's head."""
    rng = torch.Generator().manual_seed(seed)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for first, second in pairs:
        if first not in cache:
            with torch.inference_mode():
                logits = target.model(input_ids=torch.tensor([prompt_ids + [first]])).logits[0, -1]  # [V]
            cache[first] = warp(logits.float(), SamplingConfig(temperature=1.0))  # [V]
        p = cache[first]
        below = float(p[p > p[second]].sum())  # ties (equal probabilities) counted as after
        out.append(below + float(torch.rand((), generator=rng)) * float(p[second]))
    return out


def test_second_token_follows_the_target_while_the_draft_proposes(tiny_stack, tiny_target, tokenizer):
    from scipy.stats import kstest

    channel, stub = connect(tiny_stack.address)
    with channel:
        results = [generate(stub, build_request(prompt=PROMPT, method="draft_model", temperature=1.0, seed=s,
                                                max_new_tokens=2), timeout_s=60) for s in range(SAMPLES)]
        again = generate(stub, build_request(prompt=PROMPT, method="draft_model", temperature=1.0, seed=7,
                                             max_new_tokens=2), timeout_s=60)
    assert again.token_ids == results[7].token_ids  # a seed reproduces its sample
    assert all(len(r.token_ids) == 2 for r in results)
    # The draft drafted for every request's second token, and the sampler both kept and rejected.
    assert all(r.stats.proposed_tokens >= 1 and r.stats.draft_forward_passes >= 1 for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert 0.05 * SAMPLES < accepted < 0.95 * SAMPLES
    prompt_ids = list(tokenizer(PROMPT)["input_ids"])
    pit = _second_token_pit(tiny_target, prompt_ids, [(r.token_ids[0], r.token_ids[1]) for r in results])
    assert kstest(pit, "uniform").pvalue > 1e-3
