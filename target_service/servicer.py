"""TargetService: protobuf <-> TargetWorker, one worker per Session stream."""

from __future__ import annotations

import time

from specserve.core.distributions import to_dense
from specserve.core.errors import InvalidArgument
from specserve.core.tree import split_tree
from specserve.runtime.lookahead_worker import lookahead_op, unflatten
from specserve.runtime.medusa_step import medusa_options_from_proto
from specserve.runtime.workers import TargetWorker
from specserve.serving import hidden_states
from specserve.serving.model_host import SessionServicer, sampling_from_proto
from specserve.v1 import target_pb2, target_pb2_grpc


class TargetServicer(SessionServicer, target_pb2_grpc.TargetServiceServicer):
    worker_class = TargetWorker

    def __init__(self, host, heads=None):
        super().__init__(host)
        self.heads = heads  # Medusa heads hosted beside the model (MedusaHeads), or None

    def new_worker(self):
        if self.heads is None:
            return TargetWorker(self.host.loaded)
        from specserve.runtime.medusa_step import MedusaTargetWorker

        return MedusaTargetWorker(self.host.loaded, self.heads)

    async def GetInfo(self, request, context):
        info = self.host.info()
        info.medusa_num_heads = 0 if self.heads is None else self.heads.num_heads
        return info

    async def _handle(self, worker: TargetWorker, request: target_pb2.TargetRequest) -> target_pb2.TargetResponse:
        began = time.perf_counter()
        lookahead_tokens: list[int] = []
        op = request.WhichOneof("op")
        if op == "start":
            start = request.start
            args = [list(start.prompt_token_ids), sampling_from_proto(start.sampling), start.seed, start.return_hidden_states]
            if start.HasField("medusa"):
                args.append(medusa_options_from_proto(start.medusa, self.heads, "start.medusa"))
            token = await self.host.run_op(worker.start_op(*args), worker)
            tokens, accepted = [token], 0
        elif op == "verify" and request.verify.parents:
            verify = request.verify
            pending, tree = split_tree(list(verify.token_ids), list(verify.parents))  # greedy: draft_probs are ignored
            verdict = await self.host.run_op(worker.verify_tree_op(verify.committed_len, pending, tree), worker)
            tokens, accepted = verdict.tokens, verdict.accepted
        elif op == "verify":
            verify = request.verify
            draft_probs = None
            if verify.draft_probs and not worker.sampling.greedy:
                rows = [(d.token_ids, d.probs) for d in verify.draft_probs]
                draft_probs = to_dense(rows, self.host.loaded.vocab_size)  # [k, V]
            verdict = await self.host.run_op(worker.verify_op(verify.committed_len, list(verify.token_ids), draft_probs), worker)
            tokens, accepted = verdict.tokens, verdict.accepted
        elif op == "lookahead":
            step = request.lookahead
            levels, candidates = unflatten(step.window, list(step.window_tokens), list(step.candidate_tokens),
                                           list(step.candidate_lengths))
            result = await self.host.run_op(lookahead_op(worker, step.committed_len, step.pending_token, levels, candidates),
                                            worker)
            tokens, accepted = result.verdict.tokens, result.verdict.accepted
            lookahead_tokens = result.next_level
        else:
            raise InvalidArgument("op: expected start, verify or lookahead")
        response = target_pb2.TargetResponse(
            op_id=request.op_id,
            token_ids=tokens,
            accepted=accepted,
            committed_len=worker.kv.length,
            compute_ms=(time.perf_counter() - began) * 1e3,
            lookahead_tokens=lookahead_tokens,
            batch_tokens=self.host.scheduler.last_pass_tokens.get(id(worker), 0),
        )
        if worker.return_hidden_states:
            response.hidden_states.CopyFrom(hidden_states.to_proto(worker.last_hidden_states))  # [n, H]
        candidates = getattr(worker, "last_candidates", None) if getattr(worker, "medusa", None) else None
        if candidates is not None:
            response.medusa_candidates.token_ids.extend(candidates.tokens)
            response.medusa_candidates.parents.extend(candidates.parents or [])
        return response
