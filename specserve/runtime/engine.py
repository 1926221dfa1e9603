"""The engine interface: what the workers need from a model, and nothing more.

An `Engine` is a loaded model with its facts; each request gets one `EngineSession`
from it: one sequence's KV cache that grows by chains or trees and shrinks by rollback
or compaction to an accepted path. The workers (`runtime/workers.py`), the acceptance
rules and every method see only this, so any engine serves them alike:

- `torch` (`runtime/models.py` + `runtime/kv.py`): PyTorch, any device, every method
  (hidden states for feature drafts, trees, drafts with restricted vocabularies);
- `llama.cpp` (`runtime/llama_engine.py`): the GGUF file through llama-cpp-python, fast
  on CPU; chains, trees and hidden states (see that module for what it serves).

Both run the rows of many sessions in one forward pass (`forward_batch`, continuous
batching); worker ops yield their `Forward`s so a scheduler (`runtime/scheduler.py`) can
batch them, and `run_alone` runs an op by itself.

Logits always come back as float32 tensors on the CPU: acceptance and sampling run
there, with CPU random generators.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch


@runtime_checkable
class EngineSession(Protocol):
    """One sequence's KV cache. `length` is the number of tokens in it; `vocab_ids` maps a
    restricted-vocabulary draft's output index to its token id (None: the identity)."""

    length: int
    vocab_ids: torch.Tensor | None

    def extend(self, token_ids: list[int], logits_for: int = 1) -> torch.Tensor:
        """Appends a chain; float32 CPU logits [logits_for, V_out] of its last positions."""

    def extend_with_hidden(self, token_ids: list[int], logits_for: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `extend`, plus the last hidden state (after the final norm) of every new
        position: (logits [logits_for, V_out], hidden [n, H] on the CPU). Only engines whose
        `returns_hidden_states` is true."""

    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                    return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Appends tokens that do not form a chain (tree nodes): new token i sits at position
        `positions[i]` and sees every cached token before the last m slots plus the new
        tokens j with visible[i, j] (visible: [n, m] bool over the last m slots after this
        call, m >= n). Returns float32 CPU logits [n, V_out] of every new token and, when
        asked, hidden [n, H]. Only engines whose `supports_trees` is true."""

    def keep(self, start: int, offsets: list[int]) -> None:
        """Keeps slots start + offsets[i] (ascending) at start + i and drops everything after:
        the accepted path of a tree becomes a plain sequence."""

    def rollback(self, length: int) -> None:
        """Keeps the first `length` tokens; ValueError if the cache holds fewer."""

    def close(self) -> None:
        """Frees the cache (a session is not used after this)."""

    # Optional: `fork() -> EngineSession`, another session of the same engine holding a copy of
    # this cache. A draft drafts several outcomes of a verdict side by side in forks (the
    # torch engine has it); without it, one outcome per speculate op (`runtime/ahead.py`).


@runtime_checkable
class Engine(Protocol):
    """A loaded model and the facts the services report about it."""

    engine_name: str  # "torch", "llama.cpp"
    spec: str  # the model specification it was loaded from
    vocab_size: int  # token ids the model accepts
    max_context_tokens: int
    eos_token_ids: frozenset[int]
    hidden_size: int
    dtype_name: str  # "float32", "bfloat16", "Q4_1", ...
    quantization: str  # "none" for weights held in dtype_name, else the format ("GGUF Q4_1")
    returns_hidden_states: bool  # extend_with_hidden / extend_tree(return_hidden=True) work
    supports_trees: bool  # extend_tree works
    needs_target_hidden_states: bool  # a feature draft: drafts from the target's hidden states
    supports_batching: bool  # forward_batch works

    def new_session(self) -> EngineSession:
        """An empty KV cache for one request."""

    def forward_batch(self, forwards: list[Forward]) -> list[ForwardResult]:
        """Runs every `Forward` (of distinct sessions of this engine) in one forward pass
        (continuous batching: each session its own KV length, positions and mask); each
        session's cache grows exactly as `run_forward` would grow it. Only engines whose
        `supports_batching` is true."""


@dataclass
class Forward:
    """One session's rows in a forward pass: what a worker op asks of its engine.

    A chain (positions None) appends `token_ids` after the cache; tree nodes carry their
    positions and `visible` [n, m] (see `EngineSession.extend_tree`).
    """

    session: EngineSession
    token_ids: list[int]
    logits_for: int = 1  # float32 logits of the last rows; 0: none
    hidden: bool = False  # also the hidden state of every new row
    positions: list[int] | None = None
    visible: torch.Tensor | None = None  # [n, m] bool
    # A feature draft's second input: the target's hidden state before each row's token
    # [n, H]; its `hidden` result is then the draft's predicted states. None: a token model.
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.token_ids or not 0 <= self.logits_for <= len(self.token_ids):
            raise ValueError(f"a forward of {len(self.token_ids)} tokens cannot give logits for {self.logits_for}")

    @property
    def is_chain(self) -> bool:
        return self.visible is None


# (logits [logits_for, V_out] float32 on the CPU or None, hidden [n, H] on the CPU or None)
ForwardResult = tuple[torch.Tensor | None, torch.Tensor | None]

T = TypeVar("T")
# A worker op that needs forward passes: it yields each `Forward` it needs and is sent its
# `ForwardResult`, so a scheduler can run many sessions' ops in shared forward passes.
Op = Generator[Forward, ForwardResult, T]


def run_forward(forward: Forward) -> ForwardResult:
    """One session's rows alone, through its session's own methods."""
    session, tokens = forward.session, forward.token_ids
    if forward.features is not None:
        logits, predicted = session.extend_features(tokens, forward.features, forward.logits_for, forward.positions,
                                                    forward.visible)  # [l, V] or None, [n, H]
        return logits, (predicted if forward.hidden else None)
    if not forward.is_chain:
        logits, hidden = session.extend_tree(tokens, forward.positions, forward.visible, return_hidden=forward.hidden)
        return (logits[len(tokens) - forward.logits_for:] if forward.logits_for else None), hidden  # [l, V], [n, H]
    wanted = max(forward.logits_for, 1)  # every engine computes at least the last row's logits
    if forward.hidden:
        logits, hidden = session.extend_with_hidden(tokens, logits_for=wanted)  # [l, V], [n, H]
    else:
        logits, hidden = session.extend(tokens, logits_for=wanted), None
    return (logits if forward.logits_for else None), hidden


def run_alone(op: Op[T]) -> T:
    """Runs an op to its end, each of its forward passes on its own session alone."""
    try:
        forward = next(op)
        while True:
            forward = op.send(run_forward(forward))
    except StopIteration as done:
        return done.value


def tree_fallback_path(parents: list[int]) -> list[int]:
    """The nodes of one root-to-leaf path of a tree (parents[i] < i, -1 = a child of the
    root): at each depth the first-listed child, which a drafter lists likeliest first.
    An engine without tree attention verifies this chain instead of the whole tree."""
    path: list[int] = []
    node = -1
    while True:
        child = next((i for i in range(node + 1, len(parents)) if parents[i] == node), None)
        if child is None:
            return path
        path.append(child)
        node = child
