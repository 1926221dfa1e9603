"""Continuous batching: one model thread runs every session's forward passes, batched.

A service hands the scheduler its sessions' work: worker ops (`runtime/engine.py`'s `Op`:
generators that yield each `Forward` they need) and plain calls (work that is not an op,
e.g. a feature draft's step or closing a session). The model thread advances every op to
its next forward, then runs the forwards that are waiting as one pass (`forward_batch`)
under a token budget, sends each op its rows' results, and repeats. An op joins at the
next pass after it arrives and leaves when it returns, so sessions enter and leave the
batch at any step; nobody waits for a batch to fill (a lone op runs at once).

Fairness and chunked prefill: each pass takes the waiting forwards oldest first, short
ones (decoding steps, verify chains, trees) before long ones, so a long prompt never
holds up decoding sessions; a chain that does not fit the remaining budget is split,
and its head runs now (its KV is kept) while the rest waits for the next pass.

Gathering: a session's next op comes back one network round trip after its op returns
(through the orchestrator, and a draft step for some methods). Were a pass to start on the
first op to arrive, sessions would split into cohorts that alternate passes, each waiting
out the other's. So before a pass the thread waits, briefly, for the sessions whose next op
is due soon: each session's gap between an op's return and its next op is measured, and
the pass waits until every session due within half a pass has come (or is overdue). A
lone session never waits.

With an engine that cannot batch, or `batching=False`, each pass runs one forward alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specserve.runtime.engine import Engine, Forward, ForwardResult, Op, run_forward

LOAD_DECAY = 0.9  # per pass: how fast the reported mean batch follows the load
GAP_DECAY = 0.7  # per returning op: how fast a session's gap estimate follows
MAX_GAP_S = 0.2  # a longer gap between an op's return and the next is a pause, not part of decoding
GATHER_PASS_SHARE = 1.0  # the longest wait for due sessions, as a share of the last pass
GAP_SLACK = 2.0  # a session is due back within this many of its usual gaps


@dataclass
class _Pending:
    """An op waiting for (or between) forward passes."""

    op: Op
    future: concurrent.futures.Future
    owner: object  # the worker the op belongs to: closing it drops the op
    arrived: float = field(default_factory=time.perf_counter)
    forward: Forward | None = None
    since: float = 0.0  # when the forward began waiting
    hidden_parts: list[torch.Tensor] = field(default_factory=list)  # a split chain's earlier rows [n_i, H]


@dataclass(frozen=True)
class PassRecord:
    """One forward pass: how many sessions rode in it and how many tokens it had."""

    sessions: int
    tokens: int
    ms: float


class BatchScheduler:
    def __init__(self, engine: Engine, token_budget: int = 256, batching: bool = True,
                 on_pass: Callable[[PassRecord], None] | None = None):
        if token_budget < 1:
            raise ValueError("token_budget: must be at least 1")
        self.engine = engine
        self.token_budget = token_budget
        self.batching = batching and bool(getattr(engine, "supports_batching", False))
        self.on_pass = on_pass  # called on the model thread after every pass (metrics)
        self.mean_batch_tokens = 0.0  # decaying mean over passes
        self.last_pass_tokens: dict[int, int] = {}  # id(owner) -> tokens of the last pass its op rode in
        self._inbox: list[tuple[str, object]] = []
        self._waiting: list[_Pending] = []
        self._cv = threading.Condition()
        self._closed = False
        self._returned: dict[int, float] = {}  # id(owner) -> when its last op returned
        self._gap_s: dict[int, float] = {}  # id(owner) -> from an op's return to its next op (decaying mean)
        self._last_pass_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    # ---- called from any thread --------------------------------------------------------------
    def submit_op(self, op: Op, owner: object) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("op", _Pending(op, future, owner)))
        return future

    def submit_call(self, fn: Callable, *args, drop_ops_of: object = None) -> concurrent.futures.Future:
        """Runs fn(*args) on the model thread; first, with drop_ops_of, ends that owner's ops
        still waiting (their session is going away)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", (fn, args, future, drop_ops_of)))
        return future

    @property
    def queued(self) -> int:
        """Work waiting for the model thread: calls and ops not yet begun, ops between passes."""
        with self._cv:
            return len(self._inbox) + len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _put(self, item) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the model thread has stopped")
            self._inbox.append(item)
            self._cv.notify()

    # ---- the model thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:  # nothing more will run: every caller still waiting hears so
                    stopped = RuntimeError("the model thread has stopped")
                    for pending in self._waiting:
                        pending.op.close()
                        pending.future.set_exception(stopped)
                    for kind, item in self._inbox:
                        future = item.future if kind == "op" else item[2]
                        if future.set_running_or_notify_cancel():
                            future.set_exception(stopped)
                    return
                inbox, self._inbox = self._inbox, []
            self._take(inbox)
            if self._waiting:
                self._gather()
                self._run_pass()

    def _take(self, inbox: list) -> None:
        for kind, item in inbox:
            if kind == "call":
                self._call(*item)
            elif item.future.set_running_or_notify_cancel():  # False: the caller went away
                owner = id(item.owner)
                returned = self._returned.pop(owner, None)
                if returned is not None and 0 <= (gap := item.arrived - returned) < MAX_GAP_S:
                    last = self._gap_s.get(owner)
                    self._gap_s[owner] = gap if last is None else GAP_DECAY * last + (1 - GAP_DECAY) * gap
                self._advance(item, None, first=True)

    def _gather(self) -> None:
        """Waits (see the module doc) for ops of sessions that are likely on their way back."""
        if not self.batching:
            return
        began = time.perf_counter()
        while True:
            now = time.perf_counter()
            limit = began + GATHER_PASS_SHARE * self._last_pass_s
            # When each session whose op is out is due back (with slack), not past the limit.
            due = [t + GAP_SLACK * self._gap_s[o] for o, t in self._returned.items() if o in self._gap_s]
            deadline = min(max((d for d in due if d > now), default=now), limit)
            if deadline <= now:
                return
            with self._cv:
                if not self._inbox and not self._closed:
                    self._cv.wait(deadline - now)
                inbox, self._inbox = self._inbox, []
            self._take(inbox)

    def _call(self, fn: Callable, args: tuple, future: concurrent.futures.Future, drop_ops_of: object) -> None:
        if drop_ops_of is not None:
            for pending in [p for p in self._waiting if p.owner is drop_ops_of]:
                self._waiting.remove(pending)
                pending.op.close()
                pending.future.set_exception(concurrent.futures.CancelledError("the session closed"))
            self.last_pass_tokens.pop(id(drop_ops_of), None)
            self._returned.pop(id(drop_ops_of), None)
            self._gap_s.pop(id(drop_ops_of), None)
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # noqa: BLE001 (handed to the caller)
            future.set_exception(error)

    def _advance(self, pending: _Pending, result: ForwardResult | None, first: bool = False) -> None:
        """Sends the op its forward's result (or starts it) and runs it to its next forward."""
        try:
            forward = next(pending.op) if first else pending.op.send(result)
        except StopIteration as done:
            self._returned[id(pending.owner)] = time.perf_counter()
            pending.future.set_result(done.value)
            return
        except BaseException as error:  # noqa: BLE001 (an op's error is its caller's)
            self._returned[id(pending.owner)] = time.perf_counter()
            pending.future.set_exception(error)
            return
        pending.forward, pending.since, pending.hidden_parts = forward, time.perf_counter(), []
        self._waiting.append(pending)

    def _run_pass(self) -> None:
        chosen = self._choose()
        began = time.perf_counter()
        forwards = [part for _, part in chosen]
        try:
            if len(forwards) > 1:
                results = self.engine.forward_batch(forwards)
            else:
                results = [run_forward(forwards[0])]
        except BaseException as error:  # noqa: BLE001 (every op of the pass fails with it)
            for pending, _ in chosen:
                if pending in self._waiting:
                    self._waiting.remove(pending)
                pending.op.close()
                pending.future.set_exception(error)
            return
        tokens = sum(len(f.token_ids) for f in forwards)
        self.mean_batch_tokens = LOAD_DECAY * self.mean_batch_tokens + (1 - LOAD_DECAY) * tokens
        self._last_pass_s = time.perf_counter() - began
        record = PassRecord(len(forwards), tokens, self._last_pass_s * 1e3)
        for (pending, part), (logits, hidden) in zip(chosen, results):
            self.last_pass_tokens[id(pending.owner)] = tokens
            if part is not pending.forward:  # the head of a split chain: the rest waits
                if hidden is not None:
                    pending.hidden_parts.append(hidden)
                continue
            self._waiting.remove(pending)
            if pending.hidden_parts:
                hidden = torch.cat([*pending.hidden_parts, hidden])  # [n, H]
            self._advance(pending, (logits, hidden))
        if self.on_pass is not None:
            self.on_pass(record)

    def _choose(self) -> list[tuple[_Pending, Forward]]:
        """This pass's forwards: (op, the forward or the head of its chain that runs now)."""
        if not self.batching:
            pending = min(self._waiting, key=lambda p: p.since)
            return [(pending, self._head(pending, self.token_budget) or pending.forward)]
        # Short forwards first (decoding sessions), each group oldest first.
        order = sorted(self._waiting, key=lambda p: (len(p.forward.token_ids) > self.token_budget // 4, p.since))
        chosen: list[tuple[_Pending, Forward]] = []
        budget = self.token_budget
        for pending in order:
            part = self._head(pending, budget)
            if part is None:
                continue
            chosen.append((pending, part))
            budget -= len(part.token_ids)
            if budget <= 0:
                break
        if not chosen:  # nothing fits (a tree larger than the budget): the oldest runs alone
            pending = min(self._waiting, key=lambda p: p.since)
            chosen.append((pending, pending.forward))
        return chosen

    def _head(self, pending: _Pending, budget: int) -> Forward | None:
        """The pending forward if it fits in `budget` tokens, else a chain's first part that
        does (keeping its logit rows in the rest), else None."""
        forward = pending.forward
        n = len(forward.token_ids)
        if n <= budget:
            return forward
        head = min(budget, n - forward.logits_for)
        if not forward.is_chain or head < 1:
            return None
        features = forward.features  # [n, H] or None
        pending.forward = dataclasses.replace(forward, token_ids=forward.token_ids[head:],
                                              features=None if features is None else features[head:])
        return dataclasses.replace(forward, token_ids=forward.token_ids[:head], logits_for=0,
                                   features=None if features is None else features[:head])


DEFAULT_TOKEN_BUDGET = 256  # without a measured profile
STEP_LATENCY_FACTOR = 4.0  # a full pass may take this many single-token passes' time


def token_budget_from_profile(costs) -> int:
    """Tokens per pass from a measured `CostProfile` (core.controller): the most a pass can
    take while costing at most STEP_LATENCY_FACTOR single-token passes, so batching raises
    throughput without stretching every session's step more than that; within [16, 2048]."""
    table = getattr(costs, "verify_chain", None)
    if table is None:
        return DEFAULT_TOKEN_BUDGET
    context = table.contexts()[0]
    limit = STEP_LATENCY_FACTOR * table.ms(1, context)
    tokens = 16
    while tokens < 2048 and table.ms(tokens * 2, context) <= limit:  # the table extrapolates past its last point
        tokens *= 2
    return tokens
