"""The llama.cpp engine: a GGUF file served by llama.cpp through llama-cpp-python's low-level API.

What it serves: every chain method (autoregressive, prompt lookup, a token draft as the
draft, a token draft hosted on it), hidden states (the last hidden state after the final
norm, read as llama.cpp's per-token embeddings: a feature draft works with a target on
this engine), tree verification (each root-to-leaf path of a tree is one llama.cpp
sequence id, so a node attends to the cache and its own ancestors only), and batched
forwards (`forward_batch`: the rows of many sessions in one llama_decode). It cannot host
a project drafter or a feature draft (those are PyTorch modules).

Sessions live in shared contexts (`runtime/llama_batch.py`): each context holds
`batch_slots` sessions, one sequence id each, and is created when the ones before are
full, so memory stays bounded by the number of sessions (n_ctx = batch_slots x the
context window per context). Contexts are kept and reused, so a new request does not
allocate. `batch_slots=1` gives every session a private context. All calls for one engine
happen on the service's model thread.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from specserve.runtime.engine import Forward, ForwardResult
from specserve.runtime.llama_batch import HIDDEN_CHUNK, LLAMA_MAX_SEQ, ContextHome, Job, llama_library, decode_jobs

# The most root-to-leaf paths one tree may have (each borrows a sequence id while in the cache).
MAX_TREE_LEAVES = 64
# Sessions per context by default: 1, a private context each. Rows of sessions sharing a context
# go through one llama_decode, but their cells interleave in the shared cell store, and flash
# attention sums a row's attention in cell order: a session whose tokens land in cells another
# session freed sums in another order than alone, and its greedy output can part from plain
# decoding (measured: 9 of 16 streams identical at 16 clients). Alone, a session's cells stay in
# position order (see LlamaSession's spent tree cells), and its output is plain decoding's.
BATCH_SLOTS = 1


def _log_errors_only(level: int, text: bytes, user_data) -> None:
    if level == 3:  # GGML_LOG_LEVEL_ERROR; llama.cpp's info lines would flood the service log
        import sys

        print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)


_LOG_CALLBACK = None  # the ctypes wrapper must outlive every call into llama.cpp


class LlamaEngine:
    """A GGUF model loaded once; `new_session()` hands out a KV cache (a slot in a shared context)."""

    engine_name = "llama.cpp"
    returns_hidden_states = True
    supports_trees = True
    needs_target_hidden_states = False
    supports_batching = True

    def __init__(self, spec: str, path: Path, threads: int | None = None, context_tokens: int = 4096,
                 batch_tokens: int = 512, batch_slots: int = BATCH_SLOTS):
        global _LOG_CALLBACK
        if not 1 <= batch_slots <= LLAMA_MAX_SEQ - MAX_TREE_LEAVES:
            raise ValueError(f"batch_slots must be in [1, {LLAMA_MAX_SEQ - MAX_TREE_LEAVES}], got {batch_slots}")
        ll = llama_library()
        if _LOG_CALLBACK is None:
            _LOG_CALLBACK = ll.llama_log_callback(_log_errors_only)
            ll.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path}")
        self.spec = spec
        self.path = path
        self.threads = threads or max(1, min(len(__import__("os").sched_getaffinity(0)), 8))
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.vocab_size = int(ll.llama_vocab_n_tokens(self.vocab))
        self.hidden_size = int(ll.llama_model_n_embd(self.model))
        self.max_context_tokens = min(context_tokens, int(ll.llama_model_n_ctx_train(self.model)))
        self.batch_tokens = batch_tokens
        self.batch_slots = batch_slots
        self.eos_token_ids = frozenset(t for t in range(self.vocab_size) if ll.llama_vocab_is_eog(self.vocab, t))
        description = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self.model, description, len(description))
        self.dtype_name = description.value.decode().split()[-1]  # "llama 135M Q4_1" -> "Q4_1"
        self.quantization = f"GGUF {self.dtype_name}"
        self._homes: list[ContextHome] = []

    def new_session(self) -> LlamaSession:
        return LlamaSession(self)

    def forward_batch(self, forwards: list[Forward]) -> list[ForwardResult]:
        """Every forward in one llama_decode per shared context involved (see `runtime/engine.py`)."""
        sessions = [f.session for f in forwards]
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("forward_batch: each session may appear once")
        for s in sessions:
            if not isinstance(s, LlamaSession) or s.engine is not self or s.home is None:
                raise ValueError("forward_batch: every session must be an open session of this engine")
        if any(f.features is not None for f in forwards):
            raise ValueError("forward_batch: the llama.cpp engine hosts no feature draft (features must be None)")
        plans = [s._plan(f.token_ids, f.positions, f.visible) for s, f in zip(sessions, forwards)]
        jobs: list[Job] = []
        try:
            for s, f, plan in zip(sessions, forwards, plans):
                jobs.append(s._job(f.token_ids, plan, f.logits_for, f.hidden))
        except BaseException:  # e.g. tree ids exhausted: give back what the earlier trees borrowed
            for job in jobs:
                job.session._abandon(job)
            raise
        results = self._run(jobs)
        return [(None if logits is None else torch.from_numpy(logits),  # [logits_for, V]
                 None if hidden is None else torch.from_numpy(hidden)) for logits, hidden in results]  # [n, H]

    def _run(self, jobs: list[Job]) -> list[tuple]:
        """Decodes the jobs, one decode per home; commits every session's growth or none."""
        by_home: dict[int, list[int]] = {}
        for index, job in enumerate(jobs):
            by_home.setdefault(id(job.session.home), []).append(index)
        results: list[tuple] = [None] * len(jobs)
        try:
            for indices in by_home.values():
                home = jobs[indices[0]].session.home
                batch = [jobs[i] for i in indices]
                for i, result in zip(indices, decode_jobs(home, batch, self.vocab_size, self.hidden_size,
                                                          self.batch_tokens)):
                    results[i] = result
        except BaseException:
            for job in jobs:
                job.session._abandon(job)
            raise
        for job in jobs:
            job.session._commit(job)
        return results

    def _place(self) -> tuple[ContextHome, int]:
        """A free session slot: in the fullest shared context with room, else in a new one."""
        open_homes = [h for h in self._homes if h.free_slots]
        if open_homes:
            home = max(open_homes, key=lambda h: h.in_use)
        else:
            # Tree paths, and one spent-cells id per session (LlamaSession).
            tree_ids = MAX_TREE_LEAVES + 1 if self.batch_slots == 1 else LLAMA_MAX_SEQ - self.batch_slots
            home = ContextHome(self, self.batch_slots, tree_ids)
            self._homes.append(home)
        return home, home.take_slot()

    def close(self) -> None:
        for home in self._homes:
            home.free()
        self._homes = []
        if self.model:
            llama_library().llama_model_free(self.model)
            self.model = None


class LlamaSession:
    """One sequence's KV cache: a sequence id in a shared llama.cpp context (see `runtime/engine.py`)."""

    vocab_ids = None

    def __init__(self, engine: LlamaEngine):
        self.engine = engine
        self.home, self.seq = engine._place()
        self.length = 0
        self._tree: tuple[int, list[list[int]], list[int]] | None = None  # (start, ids of each node, borrowed ids)
        # Spent tree cells (nodes off the accepted path) stay held by this sequence id, seen by no
        # row: freed, they would be the lowest free cells and take the next tokens, out of position
        # order below the session's newer cells, and flash attention, which sums in cell order,
        # would then sum in another order than plain decoding. Freed only when the window needs
        # the room (then the order may change) and when the session closes.
        self.spent = self.home.borrow_tree_ids(1)[0]
        self.spent_cells = 0

    def extend(self, token_ids: list[int], logits_for: int = 1) -> torch.Tensor:
        logits, _ = self._alone(token_ids, None, None, logits_for, False)
        return logits

    def extend_with_hidden(self, token_ids: list[int], logits_for: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self._alone(token_ids, None, None, logits_for, True)

    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                    return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._alone(token_ids, positions, visible, len(token_ids), return_hidden)

    def keep(self, start: int, offsets: list[int]) -> None:
        ll = llama_library()
        if self._tree is not None:
            tree_start, sequences, _ = self._tree
            if start != tree_start:
                raise ValueError(f"keep({start}): the tree was appended at {tree_start}")
            path_seq = sequences[offsets[-1]][0]  # a path through the last kept node
            end = start + len(offsets)
            ll.llama_memory_seq_rm(self.home.memory, path_seq, end, -1)
            ll.llama_memory_seq_cp(self.home.memory, path_seq, self.seq, start, end)
            self._drop_tree(kept=len(offsets))
            self.length = end
            return
        if offsets != list(range(len(offsets))):
            raise ValueError("the llama.cpp engine compacts only the path of a tree it verified")
        self.rollback(start + len(offsets))

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} tokens")
        self._drop_tree()
        if length < self.length:
            llama_library().llama_memory_seq_rm(self.home.memory, self.seq, length, -1)
            self.length = length

    def close(self) -> None:
        if self.home is not None:
            self._drop_tree()
            self.home.return_tree_ids([self.spent])
            self.home.free_slot(self.seq)
            self.home = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass

    def _drop_tree(self, kept: int = 0) -> None:
        """Removes the tree's sequence ids everywhere; its cells not `kept` on the session's own
        sequence go to the spent id (see __init__)."""
        if self._tree is not None:
            start, sequences, ids = self._tree
            ll = llama_library()
            for s in ids:
                ll.llama_memory_seq_cp(self.home.memory, s, self.spent, start, -1)
            self.spent_cells += len(sequences) - kept
            self.home.return_tree_ids(ids)
            self._tree = None

    def _alone(self, token_ids, positions, visible, logits_for, hidden):
        if self.home is None:
            raise ValueError("the session is closed")
        if not 1 <= logits_for <= len(token_ids):
            raise ValueError(f"extend: {len(token_ids)} tokens, logits for {logits_for}")
        job = self._job(token_ids, self._plan(token_ids, positions, visible), logits_for, hidden)
        logits, states = self.engine._run([job])[0]
        return torch.from_numpy(logits), (None if states is None else torch.from_numpy(states))  # [l, V], [n, H]

    def _plan(self, token_ids: list[int], positions: list[int] | None, visible: torch.Tensor | None):
        """Checks rows before anything runs: (positions, tree leaves or None)."""
        n = len(token_ids)
        if n == 0:
            raise ValueError("extend: no tokens")
        if self.length + n > self.engine.max_context_tokens:
            raise ValueError(f"{self.length + n} tokens exceed the context window of {self.engine.max_context_tokens}")
        if self.length + self.spent_cells + n > self.engine.max_context_tokens:
            llama_library().llama_memory_seq_rm(self.home.memory, self.spent, -1, -1)  # the window needs the room
            self.spent_cells = 0
        if visible is None:
            return list(range(self.length, self.length + n)), None
        if visible.shape != (n, n):
            raise ValueError("the llama.cpp engine takes a whole tree in one call (visible must be [n, n])")
        if n > HIDDEN_CHUNK:
            raise ValueError(f"a tree of {n} nodes; the llama.cpp engine takes at most {HIDDEN_CHUNK} in one call")
        # visible[i] = ancestors of i and i itself; a leaf is no other node's ancestor.
        visible = visible.bool()
        is_ancestor = visible.clone()
        is_ancestor.fill_diagonal_(False)
        leaves = [i for i in range(n) if not bool(is_ancestor[:, i].any())]
        if len(leaves) > MAX_TREE_LEAVES:
            raise ValueError(f"a tree of {len(leaves)} leaves; the llama.cpp engine takes at most {MAX_TREE_LEAVES}")
        return list(positions), (leaves, visible)

    def _job(self, token_ids: list[int], plan, logits_for: int, hidden: bool) -> Job:
        """The rows to decode; a tree borrows one sequence id per leaf, each seeing the whole cache."""
        positions, tree = plan
        if tree is None:
            return Job(self, token_ids, positions, [[self.seq]] * len(token_ids), logits_for, hidden, False)
        self._drop_tree()  # a tree not kept before the next one is dropped, as rollback would
        leaves, visible = tree
        ids = self.home.borrow_tree_ids(len(leaves))
        ll = llama_library()
        for s in ids:
            ll.llama_memory_seq_cp(self.home.memory, self.seq, s, -1, -1)
        sequences = [[ids[k] for k, leaf in enumerate(leaves) if bool(visible[leaf, i])] for i in range(len(token_ids))]
        self._tree = (self.length, sequences, ids)
        return Job(self, token_ids, positions, sequences, logits_for, hidden, True)

    def _commit(self, job: Job) -> None:
        self.length += len(job.token_ids)

    def _abandon(self, job: Job) -> None:
        """A batch failed or never ran: drops whatever of it reached the cache."""
        if job.is_tree:
            self._drop_tree()
        llama_library().llama_memory_seq_rm(self.home.memory, self.seq, self.length, -1)
