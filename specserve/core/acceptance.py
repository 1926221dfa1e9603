"""Acceptance rules for a chain of proposed tokens.

Vocabulary (as in vLLM): *accepted* tokens are proposals the target agrees with;
at the first rejection the target emits a *recovered* token instead; when every
proposal is accepted it emits a *bonus* token. Either way a verification step
yields accepted + 1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    """Result of verifying k proposals."""

    accepted: int  # proposals accepted, 0..k
    tokens: list[int]  # the accepted proposals, then one recovered or bonus token


def accept_greedy(target_logits: torch.Tensor, proposal: list[int]) -> Verdict:
    """Greedy verification: accept while the proposal equals the target's argmax.

    target_logits: [k+1, V], row i scores the position after proposal[:i].
    """
    choices = torch.argmax(target_logits, dim=-1).tolist()  # [k+1]
    accepted = 0
    while accepted < len(proposal) and proposal[accepted] == choices[accepted]:
        accepted += 1
    return Verdict(accepted, proposal[:accepted] + [choices[accepted]])


def accept_rejection_sampling(
    target_probs: torch.Tensor,
    proposal: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> Verdict:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    target_probs: [k+1, V], the target's warped distribution at each position.
    draft_probs: [k, V], the distribution each proposal was drawn from; None means
        the proposer was deterministic (probability 1 on its token).
    Accept proposal x with probability min(1, p(x)/q(x)); at the first rejection draw
    from normalize(max(p - q, 0)); after k acceptances draw a bonus token from p.
    The output is distributed exactly as sampling from the target alone.
    """
    k = len(proposal)
    for i, token in enumerate(proposal):
        p = target_probs[i]  # [V]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[i].to(p.dtype)
        u = torch.rand((), generator=generator).item()
        # u < p/q written without division; q(x) > 0 because x was drawn from q.
        if u * q[token].item() < p[token].item():
            continue
        residual = torch.clamp(p - q, min=0.0)  # [V]
        total = residual.sum()
        # p == q leaves no residual mass (rejection then has probability 0 in exact
        # arithmetic); fall back to p rather than divide by zero.
        recovered_from = residual / total if total > 0 else p
        recovered = int(torch.multinomial(recovered_from, 1, generator=generator).item())
        return Verdict(i, proposal[:i] + [recovered])
    bonus = int(torch.multinomial(target_probs[k], 1, generator=generator).item())
    return Verdict(k, proposal + [bonus])
