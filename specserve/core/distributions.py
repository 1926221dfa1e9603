"""Draft distributions on the wire: exact sparse form <-> dense tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_sparse(probs: torch.Tensor, vocab_ids: torch.Tensor | None) -> tuple[list[int], list[float]]:
    """The non-zero entries of probs [V_out] as (token ids, float32 probabilities).

    vocab_ids [V_out] maps a restricted output vocabulary to token ids (None: identity).
    """
    index = torch.nonzero(probs, as_tuple=True)[0]  # [nnz]
    ids = index if vocab_ids is None else vocab_ids[index]
    return ids.tolist(), probs[index].float().tolist()


def to_dense(rows: Sequence[tuple[Sequence[int], Sequence[float]]], vocab_size: int) -> torch.Tensor:
    """Rows of (token ids, probabilities) as a dense float32 tensor [k, V]."""
    dense = torch.zeros(len(rows), vocab_size, dtype=torch.float32)
    for i, (ids, probs) in enumerate(rows):
        if len(ids) != len(probs):
            raise ValueError(f"draft distribution {i}: {len(ids)} token ids but {len(probs)} probabilities")
        dense[i, torch.as_tensor(list(ids), dtype=torch.long)] = torch.as_tensor(list(probs), dtype=torch.float32)
    return dense
