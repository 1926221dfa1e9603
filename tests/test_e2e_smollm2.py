"""End to end on the real default model (SmolLM2-135M-Instruct), fp32, through all services."""

from __future__ import annotations

import pytest
import torch

from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig
from specserve.loading import load_model
from specserve.runtime.models import default_draft_model, load_tokenizer

pytestmark = pytest.mark.slow

REWRITE = (
    "Rewrite the following code so that every variable name is in upper case. Output only the code.\n\n"
    "def total_price(items, tax_rate):\n"
    "    subtotal = sum(item.price for item in items)\n"
    "    tax = subtotal * tax_rate\n"
    "    return subtotal + tax\n"
)
QUESTION = "What are three tips for staying productive when working from home?"


@pytest.fixture(scope="module")
def smollm2_stack(redis_url, tmp_path_factory):
    # The draft service serves the draft shipped in the repository.
    config = StackConfig(target_model="smollm2", draft_model=default_draft_model(), dtype="float32", port=0, redis=redis_url, engine="torch",
                         log_dir=tmp_path_factory.mktemp("smollm2-logs"))
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        yield stub
        channel.close()


@pytest.fixture(scope="module")
def reference():
    """Plain transformers greedy decoding of the same weights."""
    model = load_model("smollm2", "float32").model
    tokenizer = load_tokenizer("smollm2")

    def greedy(content: str, max_new_tokens: int) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        tokens = out[0, ids.shape[1]:].tolist()
        return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens

    return greedy


def chat(stub, content, method, max_new_tokens, **speculation):
    request = build_request(messages=[{"role": "user", "content": content}], method=method, max_new_tokens=max_new_tokens,
                            **speculation)
    return generate(stub, request, timeout_s=600)


@pytest.mark.parametrize("content, max_new_tokens", [(QUESTION, 48), (REWRITE, 80)])
def test_every_method_equals_transformers_greedy(smollm2_stack, reference, content, max_new_tokens):
    expected = reference(content, max_new_tokens)
    plain = chat(smollm2_stack, content, "autoregressive", max_new_tokens)
    assert plain.token_ids == expected
    drafted = chat(smollm2_stack, content, "draft_model", max_new_tokens)
    assert drafted.token_ids == expected
    # A fixed K: the controller may, on its record and the measured costs, decode plainly after a probe.
    fixed = chat(smollm2_stack, content, "draft_model", max_new_tokens, num_speculative_tokens=4, fixed_length=True)
    assert fixed.token_ids == expected
    assert fixed.stats.accepted_tokens > 0  # the shipped draft agrees with the target at times
    lookup = chat(smollm2_stack, content, "prompt_lookup", max_new_tokens)
    assert lookup.token_ids == expected
    if content is REWRITE:
        # Copying from the prompt: fewer target forward passes than tokens generated.
        assert lookup.stats.target_forward_passes < lookup.stats.generated_tokens
        assert lookup.stats.mean_accepted_length > 1.0
