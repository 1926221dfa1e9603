"""What a target session and a draft session do, on one model, synchronously.

The services run these in a worker thread; the in-process engine calls them
directly. Token ids arrive unchecked from the network, so they are checked here.
"""

from __future__ import annotations

import torch

from specserve.core.acceptance import Verdict, accept_greedy, accept_rejection_sampling
from specserve.core.distributions import to_sparse
from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.sampling import SamplingConfig, make_generator, next_token, warp
from specserve.runtime.kv import KVSession
from specserve.runtime.models import LoadedModel

SparseRow = tuple[list[int], list[float]]


class _SessionBase:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.kv = KVSession(loaded.model)
        self.sampling = SamplingConfig()
        self.generator: torch.Generator | None = None
        self.started = False

    def _begin(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        if self.started:
            raise FailedPrecondition("the session has already started")
        if not prompt:
            raise InvalidArgument("prompt_token_ids: must not be empty")
        self._check_tokens(prompt, "prompt_token_ids", 0)
        self.sampling = sampling
        self.generator = make_generator(seed)
        self.started = True

    def _check_started(self) -> None:
        if not self.started:
            raise FailedPrecondition("the session has not started: send a start op first")

    def _check_tokens(self, token_ids: list[int], field: str, after: int) -> None:
        bad = [t for t in token_ids if t >= self.loaded.vocab_size]
        if bad:
            raise InvalidArgument(f"{field}: token id {bad[0]} is outside the vocabulary of {self.loaded.vocab_size}")
        if after + len(token_ids) > self.loaded.max_context_tokens:
            raise InvalidArgument(
                f"{field}: {after + len(token_ids)} tokens exceed the context window of {self.loaded.max_context_tokens}"
            )


class TargetWorker(_SessionBase):
    """Prefills, then verifies chains: one forward pass per step."""

    def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> int:
        self._begin(prompt, sampling, seed)
        logits = self.kv.extend(prompt)  # [1, V]
        return next_token(logits[0], self.sampling, self.generator)

    def verify(self, committed_len: int, token_ids: list[int], draft_probs: torch.Tensor | None) -> Verdict:
        """token_ids = [pending, d1..dk]; draft_probs [k, V] or None (deterministic proposer)."""
        self._check_started()
        if committed_len != self.kv.length:
            raise FailedPrecondition(f"committed_len is {committed_len} but the session holds {self.kv.length} tokens")
        if not token_ids:
            raise InvalidArgument("token_ids: must hold at least the pending token")
        self._check_tokens(token_ids, "token_ids", committed_len)
        proposal = token_ids[1:]
        if draft_probs is not None and draft_probs.shape[0] != len(proposal):
            raise InvalidArgument(f"draft_probs: {draft_probs.shape[0]} distributions for {len(proposal)} proposed tokens")
        logits = self.kv.extend(token_ids, logits_for=len(token_ids))  # [k+1, V]
        if self.sampling.greedy:
            verdict = accept_greedy(logits, proposal)
        else:
            verdict = accept_rejection_sampling(warp(logits, self.sampling), proposal, draft_probs, self.generator)
        # Keep the pending token and the accepted proposals; the last verdict token is the new pending one.
        self.kv.rollback(committed_len + 1 + verdict.accepted)
        return verdict


class DraftWorker(_SessionBase):
    """Proposes k tokens autoregressively from a small model.

    `held` is the draft's sequence: everything it was sent plus its last proposals.
    The cache holds all of it but the last proposal (never fed back).
    """

    def __init__(self, loaded: LoadedModel):
        super().__init__(loaded)
        self.held: list[int] = []
        self.forward_passes = 0

    def start(self, prompt: list[int], sampling: SamplingConfig, seed: int) -> None:
        self._begin(prompt, sampling, seed)
        # The prompt's last token goes in with the first propose call, so its logits are computed then.
        if len(prompt) > 1:
            self.kv.extend(prompt[:-1])
            self.forward_passes += 1
        self.held = list(prompt)

    def propose(self, committed_len: int, token_ids: list[int], k: int) -> tuple[list[int], list[SparseRow] | None]:
        """Proposals d1..dk and, when sampling, the sparse distribution each was drawn from."""
        self._check_started()
        if committed_len > len(self.held):
            raise FailedPrecondition(f"committed_len is {committed_len} but the draft holds {len(self.held)} tokens")
        if k < 1:
            raise InvalidArgument("num_tokens: must be at least 1")
        self._check_tokens(token_ids, "token_ids", committed_len)
        if committed_len + len(token_ids) + k > self.loaded.max_context_tokens:
            raise InvalidArgument("num_tokens: the proposals would exceed the draft's context window")
        self.held = self.held[:committed_len] + list(token_ids)
        if not self.held:
            raise InvalidArgument("token_ids: the draft's sequence would be empty")
        keep = min(committed_len, self.kv.length, len(self.held) - 1)
        self.kv.rollback(keep)
        logits = self.kv.extend(self.held[keep:])[0]  # [V_out]
        self.forward_passes += 1
        proposal: list[int] = []
        rows: list[SparseRow] = []
        for i in range(k):
            token, row = self._choose(logits)
            proposal.append(token)
            if row is not None:
                rows.append(row)
            if i < k - 1:
                logits = self.kv.extend([token])[0]
                self.forward_passes += 1
        self.held.extend(proposal)
        return proposal, (None if self.sampling.greedy else rows)

    def _choose(self, logits: torch.Tensor) -> tuple[int, SparseRow | None]:
        vocab_ids = self.kv.vocab_ids
        if self.sampling.greedy:
            index = int(torch.argmax(logits).item())
            return (index if vocab_ids is None else int(vocab_ids[index])), None
        probs = warp(logits, self.sampling)  # [V_out]
        index = int(torch.multinomial(probs, 1, generator=self.generator).item())
        token = index if vocab_ids is None else int(vocab_ids[index])
        return token, to_sparse(probs, vocab_ids)
