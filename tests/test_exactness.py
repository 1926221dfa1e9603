"""Exactness on the real default model through the gRPC stack: every method in fp32 equals plain
transformers greedy decoding alone, with concurrent sessions under continuous batching, and
across a target and a draft replica killed mid-stream; and what runs is what was asked."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from specserve.bench.exactness import METHODS, run_stack, transformers_greedy
from specserve.bench.prompts import DEFAULT_PROMPT_DIR, load_prompts
from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig, free_port
from specserve.loading import llama_cpp_available
from specserve.runtime.models import default_draft_model
from specserve.v1 import model_service_pb2, target_pb2_grpc

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    # Three Spec-Bench prompts of different categories, sent as chat messages.
    chosen = {}
    for prompt in load_prompts([DEFAULT_PROMPT_DIR / "spec_bench.jsonl"]):
        chosen.setdefault(prompt.category, prompt.text)
    return list(chosen.values())[1:4]


def test_fp32_every_method_alone_batched_and_across_failover_equals_transformers(prompts, tmp_path):
    references = transformers_greedy("smollm2", "float32", prompts, MAX_NEW_TOKENS)
    cells = run_stack("torch", "float32", list(METHODS), ["alone", "batched", "failover"], prompts, MAX_NEW_TOKENS,
                      concurrency=8, references=references, log_dir=tmp_path / "logs")
    assert len(cells) == 3 * len(METHODS)
    for cell in cells:
        assert cell.total >= len(prompts)
        assert (cell.equal_plain, cell.equal_transformers) == (cell.total, cell.total), cell
        assert cell.served == "torch float32"
    # The failover round lost a target and a draft replica while every stream ran.
    assert sum(c.failovers for c in cells if c.mode == "failover") >= 1


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed (make install builds it)")
def test_llama_cpp_every_method_alone_batched_and_across_failover_equals_its_plain_decoding(prompts, tmp_path):
    """The default engine computes in Q4_1, so its reference is its own plain decoding: a session's
    logits must not depend on its pass's other rows, its tree's spent cells or its replica."""
    cells = run_stack("llama.cpp", "auto", list(METHODS), ["alone", "batched", "failover"], prompts[:2], 32,
                      concurrency=8, references=None, log_dir=tmp_path / "logs")
    for cell in cells:
        assert cell.equal_plain == cell.total, cell
        assert cell.served == "llama.cpp Q4_1 (GGUF Q4_1)"
    assert sum(c.failovers for c in cells if c.mode == "failover") >= 1


def test_an_explicit_dtype_with_llama_cpp_is_refused_with_the_flags_named():
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "target_service", "--model", "smollm2", "--engine", "llama.cpp",
                           "--dtype", "float32", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--engine llama.cpp" in done.stderr and "--dtype float32" in done.stderr
    assert "Traceback" not in done.stderr


def _info(address: str) -> model_service_pb2.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return target_pb2_grpc.TargetServiceStub(channel).GetInfo(model_service_pb2.GetInfoRequest(), timeout=10)


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed (make install builds it)")
def test_the_default_stack_serves_every_method_and_says_what_computed_it(tmp_path):
    """dtype auto, engine auto: the packaged GGUF on llama.cpp, Medusa heads included; an explicit
    float32 on the same flags serves torch float32."""
    # What `specserve up` starts with no flags: the shipped draft beside the default model.
    with Stack(StackConfig(draft_model=default_draft_model(), port=0, redis="off", threads=1,
                           log_dir=tmp_path / "auto")) as stack:
        info = _info(stack.target_addresses[0])
        assert (info.engine, info.dtype, info.quantization) == ("llama.cpp", "Q4_1", "GGUF Q4_1")
        assert info.medusa_num_heads > 0
        channel, stub = connect(stack.address)
        with channel:
            outputs = {}
            for method in METHODS:
                request = build_request(messages=[{"role": "user", "content": "Name three colours."}], method=method,
                                        max_new_tokens=24)
                result = generate(stub, request, timeout_s=300)
                assert result.stats.target.engine == "llama.cpp" and result.stats.target.quantization == "GGUF Q4_1"
                outputs[method] = result.token_ids
        assert all(tokens == outputs["autoregressive"] for tokens in outputs.values()), outputs
    with Stack(StackConfig(port=0, redis="off", threads=1, dtype="float32", draft_model=None,
                           log_dir=tmp_path / "fp32")) as stack:
        info = _info(stack.target_addresses[0])
        assert (info.engine, info.dtype, info.quantization) == ("torch", "float32", "none")
