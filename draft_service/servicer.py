"""DraftService: protobuf <-> DraftWorker (or FeatureDraftWorker), one worker per Session stream."""

from __future__ import annotations

import asyncio
import time

from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.tree import TreeShape
from specserve.runtime.ahead import branch_op, speculate_op
from specserve.runtime.workers import DraftWorker, FeatureDraftWorker
from specserve.serving import hidden_states
from specserve.serving.model_host import SessionServicer, sampling_from_proto
from specserve.v1 import common_pb2, draft_pb2, draft_pb2_grpc


class DraftServicer(SessionServicer, draft_pb2_grpc.DraftServiceServicer):
    def new_worker(self) -> DraftWorker | FeatureDraftWorker:
        # A feature draft drafts from the target's hidden states, sent with each propose op.
        loaded = self.host.loaded
        return FeatureDraftWorker(loaded) if loaded.needs_target_hidden_states else DraftWorker(loaded)

    async def _handle(self, worker: DraftWorker | FeatureDraftWorker, request: draft_pb2.DraftRequest) -> draft_pb2.DraftResponse:
        began = time.perf_counter()
        passes_before = worker.forward_passes
        op = request.WhichOneof("op")
        response = draft_pb2.DraftResponse(op_id=request.op_id)
        if op == "start":
            start = request.start
            args = (list(start.prompt_token_ids), sampling_from_proto(start.sampling), start.seed)
            if isinstance(worker, FeatureDraftWorker):  # its start runs no forward pass
                await self.host.run(worker.start, *args)
            else:
                await self.host.run_op(worker.start_op(*args), worker)
        elif op == "propose" and request.propose.HasField("tree"):
            propose = request.propose
            if not isinstance(worker, FeatureDraftWorker):
                raise FailedPrecondition("tree: the hosted draft is a token draft, which proposes chains only; "
                                         "trees need a feature draft (ModelInfo.needs_target_hidden_states)")
            t = propose.tree
            shape = TreeShape(depth=t.depth, width=t.width, branch=t.branch, nodes=t.nodes)
            shape.check("tree")
            sent = propose.HasField("hidden_states")
            hidden = hidden_states.from_proto(propose.hidden_states) if sent else None  # [len(token_ids), H]
            tree = await self.host.run_op(worker.propose_tree_op(propose.committed_len, list(propose.token_ids), hidden, shape),
                                          worker)
            response.token_ids.extend(tree.tokens)
            response.parents.extend(tree.parents)
        elif op == "propose":
            propose = request.propose
            args = [propose.committed_len, list(propose.token_ids), propose.num_tokens]
            if isinstance(worker, FeatureDraftWorker):
                sent = propose.HasField("hidden_states")
                args.append(hidden_states.from_proto(propose.hidden_states) if sent else None)  # [len(token_ids), H]
            tokens, rows = await self.host.run_op(worker.propose_op(*args), worker)
            response.token_ids.extend(tokens)
            for ids, probs in rows or []:
                response.probs.append(common_pb2.SparseDistribution(token_ids=ids, probs=probs))
        elif op == "speculate":
            if isinstance(worker, FeatureDraftWorker):
                raise FailedPrecondition("speculate: a feature draft drafts from the target's hidden states of verified "
                                         "tokens, so it cannot draft ahead of a verdict; draft synchronously")
            response.outcomes.extend(await self._speculate(worker, request.speculate))
        else:
            raise InvalidArgument("op: expected start, propose or speculate")
        response.forward_passes = worker.forward_passes - passes_before
        response.compute_ms = (time.perf_counter() - began) * 1e3
        return response

    async def _speculate(self, worker: DraftWorker, speculate: draft_pb2.DraftSpeculate) -> list[draft_pb2.DraftOutcome]:
        """The outcomes' next proposals: their branches' ops run at once, so their rows share forward passes."""
        outcomes = [(o.accepted, o.guesses) for o in speculate.outcomes]
        k = speculate.num_tokens
        branches = await self.host.run_op(speculate_op(worker, speculate.committed_len, list(speculate.token_ids),
                                                       speculate.proposal_len, outcomes, k), worker)
        drafting = [self.host.run_op(branch_op(worker, branch, k), worker) for branch in branches if not branch.drafted]
        drafted = await asyncio.gather(*drafting, return_exceptions=True)
        failed = next((error for error in drafted if isinstance(error, BaseException)), None)
        if failed is not None:
            raise failed
        return [draft_pb2.DraftOutcome(accepted=b.accepted, token_id=b.token, context_len=b.context_len, token_ids=b.proposal)
                for b in branches]
