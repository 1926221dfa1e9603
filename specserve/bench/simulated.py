"""Simulated models: a fixed forward-pass time and a set acceptance rate, for measuring
what the orchestration itself costs.

Spec: "sim:role=target,step_ms=5" or "sim:role=draft,step_ms=0.5,accept=0.8" (keys:
role target|draft, step_ms >= 0, accept in [0, 1] (draft only), vocab; defaults below).

- The target's greedy next token after token t is next_token(t) = FIRST + (t*A + B) mod
  (V - FIRST): never a special token (SmolLM2's are ids 0..16), so generation never
  stops early and always produces max_new_tokens.
- The draft predicts next_token(t) with probability `accept` and a different token
  otherwise; the coin is a hash of (position, token), so runs are reproducible and a
  proposal's fate does not depend on anything else. With greedy verification each
  proposal (after correct ones) is accepted with probability `accept`.
- Every forward pass sleeps step_ms + token_ms x its tokens (token_ms defaults to 0: a
  GPU-like pass whose cost does not grow with its tokens). A batched pass over several
  sessions (`forward_batch`, continuous batching) sleeps once for all of them.
- The KV cache holds one [1, 1, n, 1] zero tensor per call, so `DynamicCache.crop` and
  `get_seq_length` (the position of the next token) work as for a real model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

VOCAB_SIZE = 49152  # SmolLM2's, so the orchestrator can detokenize with its tokenizer
FIRST_ORDINARY_TOKEN = 17  # SmolLM2's special tokens are ids 0..16
EOS_TOKEN_IDS = frozenset({0, 2})  # <|endoftext|>, <|im_end|>
MULTIPLIER, OFFSET = 7919, 104729
MAX_CONTEXT_TOKENS = 8192
LOGIT_HIGH = 20.0  # the chosen token's logit; every other token's is 0


@dataclass(frozen=True)
class SimSpec:
    role: str = "target"
    step_ms: float = 0.0
    token_ms: float = 0.0
    accept: float = 1.0
    vocab: int = VOCAB_SIZE


def parse_spec(spec: str) -> SimSpec:
    """"sim:role=draft,step_ms=2,accept=0.8" -> SimSpec; ValueError on anything else."""
    if not spec.startswith("sim:"):
        raise ValueError(f"a simulated model spec starts with 'sim:', got {spec!r}")
    fields: dict[str, str] = {}
    for item in filter(None, spec[4:].split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in SimSpec.__dataclass_fields__:
            raise ValueError(f"{spec!r}: expected key=value with key in role, step_ms, token_ms, accept, vocab; got {item!r}")
        fields[key] = value
    parsed = SimSpec(
        role=fields.get("role", "target"),
        step_ms=float(fields.get("step_ms", 0.0)),
        token_ms=float(fields.get("token_ms", 0.0)),
        accept=float(fields.get("accept", 1.0)),
        vocab=int(fields.get("vocab", VOCAB_SIZE)),
    )
    if parsed.role not in ("target", "draft") or min(parsed.step_ms, parsed.token_ms) < 0 or not 0.0 <= parsed.accept <= 1.0:
        raise ValueError(f"{spec!r}: role must be target|draft, step_ms and token_ms >= 0, accept in [0, 1]")
    if parsed.vocab <= FIRST_ORDINARY_TOKEN + 1:
        raise ValueError(f"{spec!r}: vocab must exceed {FIRST_ORDINARY_TOKEN + 1}")
    return parsed


def next_token(token: int, vocab: int = VOCAB_SIZE) -> int:
    """The simulated target's greedy choice after `token`."""
    return FIRST_ORDINARY_TOKEN + (token * MULTIPLIER + OFFSET) % (vocab - FIRST_ORDINARY_TOKEN)


def unit_hash(position: int, token: int) -> float:
    """A reproducible pseudo-random number in [0, 1) from (position, token) (splitmix64)."""
    x = (position * 0x9E3779B97F4A7C15 + token * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return (x >> 11) / float(1 << 53)


def draft_token(position: int, token: int, accept: float, vocab: int = VOCAB_SIZE) -> int:
    """The simulated draft's proposal after `token` at `position`: right with probability accept."""
    right = next_token(token, vocab)
    if unit_hash(position, token) < accept:
        return right
    # Any other ordinary token, also reproducible.
    span = vocab - FIRST_ORDINARY_TOKEN
    shift = 1 + int(unit_hash(position + 1, token) * (span - 1))  # in [1, span-1]
    return FIRST_ORDINARY_TOKEN + (right - FIRST_ORDINARY_TOKEN + shift) % span


def empirical_acceptance(accept: float, trials: int = 10000, vocab: int = VOCAB_SIZE) -> float:
    """Fraction of draft proposals equal to the target's choice over `trials` (position, token) pairs."""
    hits = sum(draft_token(p, (p * 31 + 7) % vocab, accept, vocab) == next_token((p * 31 + 7) % vocab, vocab) for p in range(trials))
    return hits / trials


def expected_accepted_length(accept: float, k: int) -> float:
    """tau for a fixed K: 1 + sum_{i=1..k} accept^i (one bonus/recovered token per step)."""
    return 1.0 + sum(accept**i for i in range(1, k + 1))


class SimulatedLM(nn.Module):
    """Obeys the causal-LM call contract of specserve.runtime.kv.KVSession (and HF's basics)."""

    def __init__(self, sim: SimSpec):
        super().__init__()
        self.sim = sim
        self.embed = nn.Embedding(sim.vocab, 1)  # only its shape matters: vocab_size = weight.shape[0]
        self.config = SimpleNamespace(max_position_embeddings=MAX_CONTEXT_TOKENS, eos_token_id=sorted(EOS_TOKEN_IDS))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True, logits_to_keep: int = 0, **_):
        self._sleep(input_ids.numel())
        logits = self._logits(input_ids, past_key_values, logits_to_keep)  # [B, m, V]
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)

    def forward_batch(self, forwards) -> list:
        """Several sessions' chains in one pass (runtime.engine.Forward; no trees, no hidden states)."""
        self._sleep(sum(len(f.token_ids) for f in forwards))
        results = []
        for f in forwards:
            if not f.is_chain or f.hidden:
                raise ValueError("a simulated model takes chains only")
            logits = self._logits(torch.tensor([f.token_ids]), f.session.cache, max(f.logits_for, 1))[0]  # [m, V]
            f.session.length += len(f.token_ids)
            results.append((logits if f.logits_for else None, None))
        return results

    def _sleep(self, tokens: int) -> None:
        ms = self.sim.step_ms + self.sim.token_ms * tokens
        if ms > 0:
            time.sleep(ms / 1e3)

    def _logits(self, input_ids: torch.Tensor, past_key_values, logits_to_keep: int) -> torch.Tensor:
        """The target's (or draft's) logits of the last rows, the cache grown by the rows."""
        batch, n = input_ids.shape  # [1, n]
        start = 0
        if past_key_values is not None:
            start = past_key_values.get_seq_length()
            placeholder = torch.from_numpy(np.zeros((batch, 1, n, 1), dtype=np.float32))  # [B, heads=1, n, head_dim=1]
            past_key_values.update(placeholder, placeholder, 0)
        keep = n if logits_to_keep in (0, None) else min(int(logits_to_keep), n)
        # numpy, not torch.zeros: torch's intra-op threads stall for ms on a busy 2-core machine.
        logits = np.zeros((batch, keep, self.sim.vocab), dtype=np.float32)  # [B, m, V]
        for row in range(batch):
            for j, index in enumerate(range(n - keep, n)):
                token = int(input_ids[row, index])
                chosen = (next_token(token, self.sim.vocab) if self.sim.role == "target"
                          else draft_token(start + index, token, self.sim.accept, self.sim.vocab))
                logits[row, j, chosen] = LOGIT_HIGH
        return torch.from_numpy(logits)


def load_simulated(spec: str, dtype: torch.dtype):
    """A LoadedModel for a "sim:..." spec (the hook in specserve.runtime.models.load_model)."""
    from specserve.runtime.models import LoadedModel

    sim = parse_spec(spec)
    return LoadedModel(
        spec=spec,
        model=SimulatedLM(sim).eval(),
        dtype=dtype,  # nominal: the simulation computes nothing in it
        vocab_size=sim.vocab,
        max_context_tokens=MAX_CONTEXT_TOKENS,
        eos_token_ids=EOS_TOKEN_IDS,
        supports_batching=True,
    )
