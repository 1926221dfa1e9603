"""MEDUSA end to end on the real default model with the shipped heads, fp32, through the services:
greedy output token for token the same as AUTOREGRESSIVE; typical acceptance flagged lossy."""

from __future__ import annotations

import pytest

from specserve.client import build_request, connect, generate
from specserve.drafter.prompts import heldout_prompts
from specserve.launcher import Stack, StackConfig
from specserve.v1 import orchestrator_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    # No --medusa: the target's default ("auto") serves the shipped heads for the default model.
    # The torch engine: Medusa's tree step runs on its sessions (the llama.cpp engine hosts no heads).
    config = StackConfig(target_model="smollm2", draft_model=None, dtype="float32", engine="torch", port=0, redis="off", threads=1,
                         default_method="medusa", log_dir=tmp_path_factory.mktemp("medusa-smollm2-logs"))
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        yield stub
        channel.close()


def chat(stub, prompt: str, **kwargs):
    request = build_request(messages=[{"role": "user", "content": prompt}], max_new_tokens=48, **kwargs)
    return generate(stub, request, timeout_s=600)


@pytest.mark.parametrize("prompt", heldout_prompts()[:2])
def test_medusa_with_shipped_heads_equals_autoregressive(stub, prompt):
    plain = chat(stub, prompt, method="autoregressive")
    medusa = chat(stub, prompt)  # the server's default method here: MEDUSA
    assert medusa.stats.method == pb.MEDUSA and not medusa.stats.lossy
    assert medusa.token_ids == plain.token_ids
    assert medusa.stats.accepted_tokens > 0  # the shipped heads guess some of the target's tokens
    assert medusa.stats.target_forward_passes < plain.stats.target_forward_passes


def test_typical_acceptance_is_flagged_lossy(stub):
    result = chat(stub, heldout_prompts()[2], method="medusa", temperature=0.7, seed=3, typical_acceptance=True)
    assert result.stats.lossy and result.stats.generated_tokens > 0
