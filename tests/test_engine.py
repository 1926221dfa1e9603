"""The engine interface: the PyTorch engine satisfies it, and the workers' fallback for an
engine without tree attention (verify the tree's first-listed path as a chain) stays exact."""

from __future__ import annotations

import dataclasses

import pytest

from specserve.runtime.engine import Engine, EngineSession, tree_fallback_path
from conftest import oracle_tree_decode, plain_greedy


def test_the_torch_engine_satisfies_the_interface(tiny_target):
    assert isinstance(tiny_target, Engine)
    assert tiny_target.engine_name == "torch"
    assert tiny_target.supports_trees and tiny_target.returns_hidden_states
    assert tiny_target.hidden_size == 64
    session = tiny_target.new_session()
    assert isinstance(session, EngineSession)
    session.extend([1, 2, 3])
    session.close()
    assert session.length == 0


@pytest.mark.parametrize("parents, path", [
    ([], []),
    ([-1, -1, 0, 0, 2], [0, 2, 4]),  # first-listed child at every depth
    ([-1, 0, 1], [0, 1, 2]),  # a chain
    ([-1, -1, 1], [0]),  # the second root child's subtree is not followed
])
def test_tree_fallback_path(parents, path):
    assert tree_fallback_path(parents) == path


def test_an_engine_without_trees_verifies_a_chain_and_stays_exact(tiny_target):
    chains_only = dataclasses.replace(tiny_target, supports_trees=False)
    prompt = [1, 504, 3000, 77, 504, 3000]
    plain = plain_greedy(tiny_target, prompt, 45)
    out, accepted = oracle_tree_decode(chains_only, prompt, 40, plain)
    assert out == plain[:40]
    assert accepted > 5  # the truth is often the first-listed child
