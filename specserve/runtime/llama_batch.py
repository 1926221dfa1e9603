"""llama.cpp contexts shared by many sessions, and one decode over many sessions' rows.

A `ContextHome` is one llama.cpp context whose unified KV cell store holds up to `slots`
sessions. Its sequence ids: 0 .. slots-1 are the sessions' own sequences (one each); the
rest, up to llama.cpp's limit of 256, are a pool that trees borrow, one id per root-to-leaf
path, for as long as the tree sits in the cache (until the session's keep or rollback).
Every row of a llama_batch carries its own sequence ids and position, so rows of all the
sessions of one home go through one llama_decode (`decode_jobs`), each row attending only
to the cells of its own sequence ids.

Rows come out bit-identical whatever they are batched with (see the V cache type below).
The cost of sharing: llama.cpp builds and scans each row's attention mask over the whole
cell store (flash attention skips the masked cells' products), so a row's attention work
grows somewhat with the tokens of every session in its home, not only its own (the weight
products, most of a forward at short contexts, are what a shared pass saves).
`n_ctx` is slots x the engine's context window: every session may grow to the full window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LLAMA_MAX_SEQ = 256  # llama.cpp's compile-time limit on n_seq_max
# Rows per llama_decode call when every row is an output (hidden states): bounds the output buffer.
HIDDEN_CHUNK = 128


def llama_library():
    """llama-cpp-python, imported when first used (it is an optional, separately built package)."""
    import llama_cpp

    return llama_cpp


class ContextHome:
    """One llama.cpp context: `slots` session sequences and a pool of tree-path ids."""

    def __init__(self, engine, slots: int, tree_ids: int):
        if slots + tree_ids > LLAMA_MAX_SEQ:
            raise ValueError(f"{slots} sessions and {tree_ids} tree paths exceed llama.cpp's {LLAMA_MAX_SEQ} sequences")
        ll = llama_library()
        params = ll.llama_context_default_params()
        # Every session may fill the window; the margin absorbs a batch's worth of scattered free cells.
        params.n_ctx = slots * engine.max_context_tokens + engine.batch_tokens
        params.n_batch = params.n_ubatch = engine.batch_tokens
        params.n_seq_max = slots + tree_ids
        params.n_outputs_max = max(engine.batch_tokens, params.n_seq_max)  # llama.cpp reserves n_seq_max outputs
        params.kv_unified = True  # one cell store: copying a sequence id onto cells is free
        params.n_threads = params.n_threads_batch = engine.threads
        params.pooling_type = ll.LLAMA_POOLING_TYPE_NONE  # embeddings = per-token hidden states
        params.embeddings = False
        params.no_perf = True
        # Flash attention with a Q8_0 V cache accumulates every row's attention in float32 and
        # skips masked cells, so a row's result does not depend on the batch it runs in nor on
        # other sessions' cells (with an F16 V cache, llama.cpp's CPU path picks a different
        # accumulator for one-row decodes over 512+ cells: logits moved by up to ~1 and a greedy
        # choice could flip between a verify chain and plain decoding).
        params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_v = ll.GGML_TYPE_Q8_0
        self.context = ll.llama_init_from_model(engine.model, params)
        if not self.context:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = ll.llama_get_memory(self.context)
        self.batch = ll.llama_batch_init(engine.batch_tokens, 0, params.n_seq_max)
        self.embeddings_on = False
        self.slots = slots
        self.free_slots = list(range(slots - 1, -1, -1))  # pop() hands out 0 first
        self.free_tree_ids = list(range(slots + tree_ids - 1, slots - 1, -1))

    @property
    def in_use(self) -> int:
        return self.slots - len(self.free_slots)

    def take_slot(self) -> int:
        return self.free_slots.pop()

    def free_slot(self, seq: int) -> None:
        llama_library().llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_slots.append(seq)

    def borrow_tree_ids(self, count: int) -> list[int]:
        if count > len(self.free_tree_ids):
            raise RuntimeError(f"a tree of {count} paths: only {len(self.free_tree_ids)} of this llama.cpp context's "
                               "tree sequence ids are free (other sessions' trees hold the rest)")
        return [self.free_tree_ids.pop() for _ in range(count)]

    def return_tree_ids(self, ids: list[int]) -> None:
        """Removes the ids from every cell (cells only they held are freed) and pools them again."""
        for s in ids:
            llama_library().llama_memory_seq_rm(self.memory, s, -1, -1)
        self.free_tree_ids.extend(reversed(ids))

    def free(self) -> None:
        ll = llama_library()
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.context)
        self.context = None


@dataclass
class Job:
    """One session's rows for `decode_jobs`; `sequences[i]` are row i's sequence ids."""

    session: object  # a LlamaSession
    token_ids: list[int]
    positions: list[int]
    sequences: list[list[int]]
    logits_for: int
    hidden: bool
    is_tree: bool


def _chunks(jobs: list[Job], limit: int) -> list[list[tuple[int, int, int]]]:
    """Lays the jobs' rows into decode calls of at most `limit` rows: (job, begin, end) pieces.
    A chain may be split across calls (in order); a tree stays whole in one call."""
    chunks: list[list[tuple[int, int, int]]] = [[]]
    room = limit
    for j, job in enumerate(jobs):
        n, begin = len(job.token_ids), 0
        if job.is_tree and n > room:
            chunks.append([])
            room = limit
        while begin < n:
            if room == 0:
                chunks.append([])
                room = limit
            end = min(n, begin + room)
            chunks[-1].append((j, begin, end))
            room -= end - begin
            begin = end
    return [c for c in chunks if c]


def decode_jobs(home: ContextHome, jobs: list[Job], vocab: int, width: int,
                batch_tokens: int) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """Decodes every job's rows in as few llama_decode calls as the batch size allows (one
    when they fit): per job (logits [logits_for, V] or None, hidden [n, H] or None).
    On failure every job's new cells are dropped (the sessions' lengths are untouched)."""
    ll = llama_library()
    hidden = any(job.hidden for job in jobs)
    if hidden != home.embeddings_on:
        ll.llama_set_embeddings(home.context, hidden)  # with embeddings on, every row is an output
        home.embeddings_on = hidden
    logit_parts: list[list[np.ndarray]] = [[] for _ in jobs]
    hidden_parts: list[list[np.ndarray]] = [[] for _ in jobs]
    batch = home.batch
    for chunk in _chunks(jobs, HIDDEN_CHUNK if hidden else batch_tokens):
        row = 0
        for j, begin, end in chunk:
            job = jobs[j]
            first_output = len(job.token_ids) - job.logits_for
            for i in range(begin, end):
                batch.token[row] = job.token_ids[i]
                batch.pos[row] = job.positions[i]
                batch.n_seq_id[row] = len(job.sequences[i])
                for k, s in enumerate(job.sequences[i]):
                    batch.seq_id[row][k] = s
                batch.logits[row] = hidden or i >= first_output
                row += 1
        batch.n_tokens = row
        status = ll.llama_decode(home.context, batch)
        if status != 0:
            # A failed decode may leave part of the batch in the cache: drop every job's new cells.
            for job in jobs:
                ll.llama_memory_seq_rm(home.memory, job.session.seq, job.session.length, -1)
            raise RuntimeError(f"llama_decode failed with status {status}")
        outputs = row if hidden else sum(max(0, e - max(b, len(jobs[j].token_ids) - jobs[j].logits_for))
                                         for j, b, e in chunk)
        if not outputs:
            continue
        logits = np.ctypeslib.as_array(ll.llama_get_logits(home.context), shape=(outputs * vocab,))
        logits = logits.reshape(outputs, vocab)  # [outputs, V], in row order
        states = None
        if hidden:
            states = np.ctypeslib.as_array(ll.llama_get_embeddings(home.context), shape=(row * width,))
            states = states.reshape(row, width)  # [rows, H]
        taken = 0
        for j, begin, end in chunk:
            job = jobs[j]
            first_output = len(job.token_ids) - job.logits_for
            if hidden:
                keep_from = max(begin, first_output)
                if keep_from < end:
                    logit_parts[j].append(logits[taken + keep_from - begin:taken + end - begin].copy())
                if job.hidden:
                    hidden_parts[j].append(states[taken:taken + end - begin].copy())
                taken += end - begin
            else:
                count = max(0, end - max(begin, first_output))
                if count:
                    logit_parts[j].append(logits[taken:taken + count].copy())
                taken += count
    return [(np.concatenate(lp) if job.logits_for else None, np.concatenate(hp) if job.hidden else None)
            for job, lp, hp in zip(jobs, logit_parts, hidden_parts)]
