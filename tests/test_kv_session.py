"""KV sessions: rollback gives the same logits as never having gone further."""

from __future__ import annotations

import pytest
import torch

from specserve.runtime.kv import KVSession


def test_rollback_then_extend_matches_a_fresh_session(tiny_target):
    tokens = [5, 17, 300, 42, 9000, 7, 123]
    session = KVSession(tiny_target.model)
    session.extend(tokens[:4])
    session.extend([1, 2, 3])  # rejected proposals
    session.rollback(4)
    assert session.length == 4
    after_rollback = session.extend(tokens[4:], logits_for=3)  # [3, V]

    fresh = KVSession(tiny_target.model)
    reference = fresh.extend(tokens, logits_for=3)
    torch.testing.assert_close(after_rollback, reference, rtol=1e-5, atol=1e-5)


def test_batch_and_single_token_extension_agree(tiny_target):
    tokens = [11, 22, 33, 44, 55]
    batched = KVSession(tiny_target.model).extend(tokens, logits_for=len(tokens))  # [5, V]
    single = KVSession(tiny_target.model)
    rows = [single.extend([t])[0] for t in tokens]
    torch.testing.assert_close(batched, torch.stack(rows), rtol=1e-4, atol=1e-4)
    assert batched.argmax(-1).tolist() == torch.stack(rows).argmax(-1).tolist()


def test_rollback_bounds(tiny_target):
    session = KVSession(tiny_target.model)
    session.extend([1, 2, 3])
    with pytest.raises(ValueError):
        session.rollback(4)
    session.rollback(0)
    assert session.length == 0
