"""LOOKAHEAD end to end on the real default model (SmolLM2-135M-Instruct), fp32, through the services."""

from __future__ import annotations

import pytest

from specserve.client import build_request, connect, generate
from specserve.launcher import Stack, StackConfig
from test_e2e_smollm2 import QUESTION, REWRITE, reference  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(redis_url, tmp_path_factory):
    # The torch engine: compared with transformers' own greedy decoding.
    config = StackConfig(target_model="smollm2", dtype="float32", engine="torch", port=0, redis=redis_url,
                         log_dir=tmp_path_factory.mktemp("smollm2-lookahead-logs"))
    with Stack(config) as stack:
        channel, stub = connect(stack.address)
        yield stub
        channel.close()


@pytest.mark.parametrize("content, max_new_tokens", [(QUESTION, 48), (REWRITE, 80)])
def test_lookahead_equals_transformers_greedy(stub, reference, content, max_new_tokens):  # noqa: F811
    expected = reference(content, max_new_tokens)
    for shape in ((None, None, None), (7, 4, 7), (3, 2, 3)):
        request = build_request(messages=[{"role": "user", "content": content}], method="lookahead",
                                max_new_tokens=max_new_tokens, **dict(zip(("lookahead_window", "lookahead_ngram",
                                                                           "lookahead_guesses"), shape)))
        result = generate(stub, request, timeout_s=600)
        assert result.token_ids == expected, shape
        if content is REWRITE:
            # Copying from the prompt: fewer target forward passes than tokens generated.
            assert result.stats.mean_accepted_length > 1.0
