"""The llama.cpp engine: a GGUF file served by llama.cpp through llama-cpp-python's low-level API.

What it serves: every chain method (autoregressive, prompt lookup, a token draft as the
draft, a token draft hosted on it), hidden states (the last hidden state after the final
norm, read as llama.cpp's per-token embeddings: a feature draft works with a target on
this engine), and tree verification (each root-to-leaf path of a tree is one llama.cpp
sequence id, so a node attends to the cache and its own ancestors only). It cannot host
a project drafter or a feature draft (those are PyTorch modules).

One llama.cpp context per session; contexts are pooled and reused, so a new request
does not allocate. All calls for one engine happen on the service's model thread.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

# Sequence 0 is the session's sequence; 1..MAX_TREE_LEAVES carry the paths of a tree.
MAX_TREE_LEAVES = 64
# Rows per llama_decode call when every row is an output (hidden states): bounds the output buffer.
HIDDEN_CHUNK = 128


def _llama():
    import llama_cpp

    return llama_cpp


def _log_errors_only(level: int, text: bytes, user_data) -> None:
    if level == 3:  # GGML_LOG_LEVEL_ERROR; llama.cpp's info lines would flood the service log
        import sys

        print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)


_LOG_CALLBACK = None  # the ctypes wrapper must outlive every call into llama.cpp


class LlamaEngine:
    """A GGUF model loaded once; `new_session()` hands out a KV cache (a pooled context)."""

    engine_name = "llama.cpp"
    returns_hidden_states = True
    supports_trees = True
    needs_target_hidden_states = False
    supports_batching = False  # each session has a context of its own

    def __init__(self, spec: str, path: Path, threads: int | None = None, context_tokens: int = 4096,
                 batch_tokens: int = 512):
        global _LOG_CALLBACK
        ll = _llama()
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
        self.eos_token_ids = frozenset(t for t in range(self.vocab_size) if ll.llama_vocab_is_eog(self.vocab, t))
        description = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self.model, description, len(description))
        self.dtype_name = description.value.decode().split()[-1]  # "llama 135M Q4_1" -> "Q4_1"
        self._free_contexts: list = []

    def new_session(self) -> LlamaSession:
        return LlamaSession(self)

    def _acquire_context(self):
        if self._free_contexts:
            return self._free_contexts.pop()
        ll = _llama()
        params = ll.llama_context_default_params()
        params.n_ctx = self.max_context_tokens
        params.n_batch = params.n_ubatch = self.batch_tokens
        params.n_seq_max = MAX_TREE_LEAVES + 1
        params.kv_unified = True  # one cell store: copying a sequence id onto the context is free
        params.n_threads = params.n_threads_batch = self.threads
        params.pooling_type = ll.LLAMA_POOLING_TYPE_NONE  # embeddings = per-token hidden states
        params.embeddings = False
        params.no_perf = True
        context = ll.llama_init_from_model(self.model, params)
        if not context:
            raise RuntimeError("llama.cpp could not create a context")
        return context

    def _release_context(self, context) -> None:
        _llama().llama_memory_clear(_llama().llama_get_memory(context), True)
        self._free_contexts.append(context)

    def close(self) -> None:
        ll = _llama()
        for context in self._free_contexts:
            ll.llama_free(context)
        self._free_contexts = []
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None


class LlamaSession:
    """One sequence's KV cache in a llama.cpp context (see `runtime/engine.py`)."""

    vocab_ids = None

    def __init__(self, engine: LlamaEngine):
        ll = _llama()
        self.engine = engine
        self.context = engine._acquire_context()
        self.memory = ll.llama_get_memory(self.context)
        ll.llama_set_embeddings(self.context, False)  # a pooled context may come with them on
        self.batch = ll.llama_batch_init(engine.batch_tokens, 0, MAX_TREE_LEAVES + 1)
        self.length = 0
        self._embeddings_on = False
        self._tree: tuple[int, list[list[int]]] | None = None  # (start, sequence ids of each node)

    def extend(self, token_ids: list[int], logits_for: int = 1) -> torch.Tensor:
        logits, _ = self._run(token_ids, [self.length + i for i in range(len(token_ids))], None, logits_for, False)
        return logits

    def extend_with_hidden(self, token_ids: list[int], logits_for: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(token_ids, [self.length + i for i in range(len(token_ids))], None, logits_for, True)

    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                    return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, m = visible.shape
        if m != n:
            raise ValueError("the llama.cpp engine takes a whole tree in one call (visible must be [n, n])")
        # visible[i] = ancestors of i and i itself; a leaf is no other node's ancestor.
        visible = visible.bool()
        is_ancestor = visible.clone()
        is_ancestor.fill_diagonal_(False)
        leaves = [i for i in range(n) if not bool(is_ancestor[:, i].any())]
        if len(leaves) > MAX_TREE_LEAVES:
            raise ValueError(f"a tree of {len(leaves)} leaves; the llama.cpp engine takes at most {MAX_TREE_LEAVES}")
        sequences = [[1 + s for s, leaf in enumerate(leaves) if bool(visible[leaf, i])] for i in range(n)]
        ll = _llama()
        for s in range(1, len(leaves) + 1):
            ll.llama_memory_seq_cp(self.memory, 0, s, -1, -1)  # every path sees the whole context
        start = self.length
        logits, hidden = self._run(token_ids, positions, sequences, n, return_hidden)
        self._tree = (start, sequences)
        return logits, hidden

    def keep(self, start: int, offsets: list[int]) -> None:
        ll = _llama()
        if self._tree is not None:
            tree_start, sequences = self._tree
            if start != tree_start:
                raise ValueError(f"keep({start}): the tree was appended at {tree_start}")
            path_seq = sequences[offsets[-1]][0]  # a path through the last kept node
            end = start + len(offsets)
            ll.llama_memory_seq_rm(self.memory, path_seq, end, -1)
            ll.llama_memory_seq_cp(self.memory, path_seq, 0, start, end)
            self._drop_tree()
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
            _llama().llama_memory_seq_rm(self.memory, -1, length, -1)
            self.length = length

    def close(self) -> None:
        if self.context is not None:
            _llama().llama_batch_free(self.batch)
            self.engine._release_context(self.context)
            self.context = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass

    def _drop_tree(self) -> None:
        """Removes the tree's sequence ids everywhere: cells only they held are freed."""
        if self._tree is None:
            return
        ll = _llama()
        for s in range(1, 1 + max(max(seqs) for seqs in self._tree[1])):
            ll.llama_memory_seq_rm(self.memory, s, -1, -1)
        self._tree = None

    def _run(self, token_ids: list[int], positions: list[int], sequences: list[list[int]] | None,
             logits_for: int, hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decodes in chunks; logits [logits_for, V] of the last rows and hidden [n, H] if asked."""
        ll = _llama()
        n = len(token_ids)
        if n == 0 or not 1 <= logits_for <= n:
            raise ValueError(f"extend: {n} tokens, logits for {logits_for}")
        if self.length + n > self.engine.max_context_tokens:
            raise ValueError(f"{self.length + n} tokens exceed the context window of {self.engine.max_context_tokens}")
        if hidden != self._embeddings_on:
            ll.llama_set_embeddings(self.context, hidden)  # with embeddings on, every row is an output
            self._embeddings_on = hidden
        chunk = HIDDEN_CHUNK if hidden else self.engine.batch_tokens
        if sequences is not None and n > chunk:
            raise ValueError(f"a tree of {n} nodes; the llama.cpp engine takes at most {chunk} in one call")
        vocab, width = self.engine.vocab_size, self.engine.hidden_size
        logit_rows: list[np.ndarray] = []
        hidden_rows: list[np.ndarray] = []
        batch = self.batch
        for begin in range(0, n, chunk):
            end = min(n, begin + chunk)
            for row, i in enumerate(range(begin, end)):
                batch.token[row] = token_ids[i]
                batch.pos[row] = positions[i]
                seqs = sequences[i] if sequences is not None else (0,)
                batch.n_seq_id[row] = len(seqs)
                for j, s in enumerate(seqs):
                    batch.seq_id[row][j] = s
                batch.logits[row] = i >= n - logits_for
            batch.n_tokens = end - begin
            status = ll.llama_decode(self.context, batch)
            if status != 0:
                # A failed decode may leave part of the chunk in the cache: drop it.
                ll.llama_memory_seq_rm(self.memory, -1, self.length, -1)
                raise RuntimeError(f"llama_decode failed with status {status}")
            self.length += end - begin
            outputs = (end - begin) if hidden else max(0, end - max(begin, n - logits_for))
            if outputs:
                data = np.ctypeslib.as_array(ll.llama_get_logits(self.context), shape=(outputs * vocab,))
                rows = data.reshape(outputs, vocab)  # [outputs, V]
                keep_from = max(0, (n - logits_for) - begin) if hidden else 0
                logit_rows.append(rows[keep_from:].copy())
            if hidden:
                data = np.ctypeslib.as_array(ll.llama_get_embeddings(self.context), shape=((end - begin) * width,))
                hidden_rows.append(data.reshape(end - begin, width).copy())  # [rows, H]
        logits = torch.from_numpy(np.concatenate(logit_rows))  # [logits_for, V]
        return logits, (torch.from_numpy(np.concatenate(hidden_rows)) if hidden else None)
