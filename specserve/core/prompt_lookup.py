"""Prompt lookup: propose the tokens that followed an earlier occurrence of the
sequence's last n tokens (Saxena 2023; HF `prompt_lookup_num_tokens`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def find_continuation(
    tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1
) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the last n tokens.

    Tries n = max_ngram down to min_ngram; the longest suffix that matches wins,
    and among its matches the most recent one (output tends to repeat what it
    produced last). Returns [] when nothing matches.
    """
    if k <= 0:
        return []
    seq = np.asarray(tokens, dtype=np.int64)  # [L]
    length = len(seq)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        pattern = seq[length - n :]  # [n]
        # windows[i] = seq[i : i + n] for every start i whose match is not the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(seq[: length - 1], n)  # [L - n, n]
        starts = np.flatnonzero((windows == pattern).all(axis=1))
        if len(starts):
            begin = int(starts[-1]) + n
            return seq[begin : begin + k].tolist()
    return []
