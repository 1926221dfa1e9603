"""Shared fixtures: tiny random models with SmolLM2's tokenizer, feature drafts for the tiny
target, a real Redis, real stacks (a token draft's and a feature draft's)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from specserve.launcher import Stack, StackConfig, free_port
from specserve.loading import load_model
from specserve.runtime.models import load_tokenizer

VOCAB = 49152  # SmolLM2's tokenizer, so the orchestrator can tokenize real text


def build_tiny_model(directory: Path, seed: int, layers: int, hidden: int = 64) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer, saved in Hugging Face format.

    A large initializer_range spreads the logits, so argmax ties (where fp32 batch
    shapes could flip a greedy choice) are vanishingly rare.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    load_tokenizer("smollm2").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-target"), seed=0, layers=2)


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-draft"), seed=1, layers=1)


@pytest.fixture(scope="session")
def tiny_target(tiny_target_dir):
    return load_model(str(tiny_target_dir), "float32")


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server on a free loopback port for the whole session."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(directory), "--loglevel", "warning"])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def tiny_stack(tiny_target_dir, tiny_draft_dir, redis_url, tmp_path_factory):
    """Target, draft and orchestrator processes on loopback with the tiny models, fp32."""
    config = StackConfig(
        target_model=str(tiny_target_dir), draft_model=str(tiny_draft_dir), dtype="float32", port=0,
        redis=redis_url, default_method="prompt_lookup", threads=1,
        log_dir=tmp_path_factory.mktemp("tiny-stack-logs"),
        extra_env={"SPECSERVE_CACHE": str(tmp_path_factory.mktemp("tiny-stack-cache"))},  # cost profiles of tmp models
    )
    with Stack(config) as stack:
        yield stack


@pytest.fixture(scope="session")
def feature_draft_dir(tiny_target, tiny_target_dir, tmp_path_factory):
    """A feature draft for the tiny target, as built before training: every 2nd token plus EOS."""
    from specserve.drafter.feature_model import build_feature_draft, save_feature_draft

    vocab_ids = torch.unique(torch.cat([torch.arange(0, VOCAB, 2), torch.tensor(sorted(tiny_target.eos_token_ids))]))  # [V_out]
    directory = tmp_path_factory.mktemp("tiny-feature-draft")
    save_feature_draft(build_feature_draft(tiny_target.model, vocab_ids), directory, target_spec=str(tiny_target_dir))
    return directory


@pytest.fixture(scope="session")
def feature_draft(feature_draft_dir):
    return load_model(str(feature_draft_dir), "float32")


@pytest.fixture(scope="session")
def agreeing_pair(tmp_path_factory):
    """(target, feature draft) that agree: a one-layer target whose attention output is zero,
    so its hidden state at a position depends on that position's token alone, and a draft
    that computes exactly that (its input is the token's embedding, its body the target's
    layer). Weights are rounded to bfloat16 first, so the draft's bfloat16 file is exact."""
    from specserve.drafter.feature_model import build_feature_draft, save_feature_draft

    directory = build_tiny_model(tmp_path_factory.mktemp("agreeing-target"), seed=3, layers=1)
    model = load_model(str(directory)).model
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    model.save_pretrained(directory)
    target = load_model(str(directory))
    draft = build_feature_draft(target.model, torch.arange(VOCAB))
    hidden = target.model.config.hidden_size
    with torch.no_grad():
        draft.fc.weight.zero_()  # [H, 2H] over [embed ; target hidden]
        draft.fc.weight[:, :hidden].copy_(torch.eye(hidden))
    draft_dir = tmp_path_factory.mktemp("agreeing-draft")
    save_feature_draft(draft, draft_dir, target_spec=str(directory))
    return target, load_model(str(draft_dir))


@pytest.fixture(scope="session")
def feature_stack(tiny_target_dir, feature_draft_dir, tmp_path_factory):
    """Target, feature draft and orchestrator on loopback, fp32, DRAFT_MODEL by default, trees
    of the default shape for greedy requests (test_feature_draft.py, test_tree.py)."""
    config = StackConfig(
        target_model=str(tiny_target_dir), draft_model=str(feature_draft_dir), dtype="float32", port=0,
        redis="off", default_method="draft_model", threads=1, log_dir=tmp_path_factory.mktemp("feature-stack-logs"),
        extra_env={"SPECSERVE_CACHE": str(tmp_path_factory.mktemp("feature-stack-cache"))},  # cost profiles of tmp models
    )
    with Stack(config) as stack:
        yield stack


def decode_locally(target, proposer, prompt, k=None, fixed=True, temperature=0.0, seed=0, max_new=30):
    """(generated tokens, DecodeStats) of the core loop on a loaded target and a proposer, in process."""
    import asyncio

    from specserve.core.adaptive import SpeculationLength
    from specserve.core.sampling import SamplingConfig
    from specserve.core.speculate import DecodeRequest, decode
    from specserve.runtime.local import LocalTargetSession

    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new, top_k=50 if temperature else 0)
    speculation = SpeculationLength(k, k_max=16, fixed=fixed) if k else None
    request = DecodeRequest(prompt, sampling, seed, frozenset(), target.max_context_tokens, speculation)

    async def collect():
        return [t async for chunk in decode(LocalTargetSession(target), proposer, request) for t in chunk.tokens]

    return asyncio.run(collect()), request.stats


def teacher_forced_hidden(target, token_ids: list[int]) -> torch.Tensor:
    """The target's last hidden states [n, H] over token_ids in one forward pass."""
    with torch.inference_mode():
        return target.model.model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]  # [n, H]


def plain_greedy(target, prompt: list[int], n: int) -> list[int]:
    """The first n tokens of plain greedy decoding with the target's worker."""
    from specserve.core.sampling import SamplingConfig
    from specserve.runtime.workers import TargetWorker

    worker = TargetWorker(target)
    out = [worker.start(prompt, SamplingConfig(), 0)]
    while len(out) < n:
        out += worker.verify(len(prompt) + len(out) - 1, [out[-1]], None).tokens
    return out[:n]


def oracle_tree_decode(target, prompt: list[int], n: int, plain: list[int], seed: int = 0) -> tuple[list[int], int]:
    """Greedy decoding by verifying random trees that hold plain decoding's continuation among
    distractor siblings and children; (tokens, accepted proposals)."""
    import random

    from specserve.core.sampling import SamplingConfig
    from specserve.core.tree import DraftTree
    from specserve.runtime.workers import TargetWorker

    rng = random.Random(seed)
    worker = TargetWorker(target)
    out = [worker.start(prompt, SamplingConfig(), 0)]
    accepted = 0
    while len(out) < n:
        tokens, parents, parent = [], [], -1
        for true_token in plain[len(out):len(out) + rng.randint(0, 4)]:
            for _ in range(rng.randint(0, 2)):  # distractor siblings before the truth
                tokens.append(rng.randrange(target.vocab_size))
                parents.append(parent)
            tokens.append(true_token)
            parents.append(parent)
            parent = len(tokens) - 1
            tokens.append(rng.randrange(target.vocab_size))  # a distractor child
            parents.append(parent)
        sequence = prompt + out
        verdict = worker.verify_tree(len(sequence) - 1, sequence[-1], DraftTree(tokens, parents))
        assert worker.kv.length == len(sequence) + verdict.accepted
        accepted += verdict.accepted
        out += verdict.tokens
    worker.close()
    return out[:n], accepted


@pytest.fixture(scope="session")
def gateway_stack(tiny_target_dir, redis_url, tmp_path_factory):
    """The tiny stack with the OpenAI-compatible gateway in front and metrics on every service
    (test_gateway.py, test_metrics.py, test_page.py). The draft service hosts the target's own
    model, so greedy proposals are always accepted and the acceptance figures are not zero."""
    config = StackConfig(
        target_model=str(tiny_target_dir), draft_model=str(tiny_target_dir), dtype="float32", port=0,
        redis=redis_url, default_method="prompt_lookup", threads=1, http_port=0, served_model_name="tiny",
        metrics=True, log_dir=tmp_path_factory.mktemp("gateway-stack-logs"),
        # The cost-blind K: these tests check the marks and figures of speculation, so it must
        # speculate even where a draft as large as its target would not pay (what cost control sees).
        extra_env={"SPECSERVE_SPECULATION_CONTROL": "adaptive"},
    )
    with Stack(config) as stack:
        yield stack
