"""Turning logits into a distribution and drawing from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding parameters after validation. temperature == 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p: logits [..., V] -> probs [..., V] (float32).

    Draft and target are warped by the same rule, so rejection sampling compares the
    distributions the two actually sample from.
    """
    if config.greedy:
        raise ValueError("warp is for sampling; greedy decoding takes the argmax")
    logits = logits.float()
    # Shifted so the largest score is exactly 0 before dividing: a tiny temperature then gives
    # 0 and -inf (the argmax, one-hot) instead of inf / inf = nan.
    scores = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature  # [..., V]
    vocab = scores.shape[-1]
    if 0 < config.top_k < vocab:
        kth = torch.topk(scores, config.top_k, dim=-1).values[..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Mass strictly before each token; a token is kept while that mass is below top_p,
        # so the most probable token is always kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id drawn from probs [V]."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def position_seed(seed: int, position: int) -> int:
    """The seed of the random draws an op makes at sequence `position` (splitmix64 of both).

    Each op of a sampled session draws from a stream keyed by the request's seed and the
    position it starts at, not from one stream consumed op after op: an op sent again (to a
    replica that replaced a dead one, whose session was rebuilt from the token record) draws
    exactly what the first attempt would have, so a seeded request is reproducible across
    failover as well as across batching."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """The next token from the logits [V] of one position."""
    if config.greedy:
        return int(torch.argmax(logits).item())
    assert generator is not None, "sampling needs a generator"
    return sample(warp(logits, config), generator)
