"""Peers: transformers' own `generate` on the same weights and prompt tokens, in this process.

Methods: "autoregressive" (plain greedy generate, the HF baseline), "prompt_lookup"
(prompt_lookup_num_tokens=10), "draft_model" (assistant_model=the draft, its restricted
head widened to the full vocabulary). Target
forward passes are counted with a forward pre-hook, so tau is known; HF does not
report accepted/proposed counts, so the acceptance rate is left empty. A feature
draft (it drafts from the target's hidden states) is not a model transformers can
assist with: "draft_model" is then skipped, with a note.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import RunRecord
from specserve.client import build_request
from specserve.generation.requests import tokenize
from specserve.runtime.models import LoadedModel

PROMPT_LOOKUP_NUM_TOKENS = 10


class FullVocabularyHead(torch.nn.Module):
    """A restricted-vocabulary head seen as a full one: uncovered tokens get the lowest logit."""

    def __init__(self, head: torch.nn.Module, vocab_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.head = head
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)  # [V_out]
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        restricted = self.head(hidden)  # [B, S, V_out]
        full = restricted.new_full((*restricted.shape[:-1], self.vocab_size), torch.finfo(restricted.dtype).min)
        return full.index_copy(-1, self.vocab_ids, restricted)  # [B, S, V]


def hf_assistant(draft: LoadedModel) -> torch.nn.Module:
    """The draft as a transformers model `generate(assistant_model=...)` accepts, same weights.

    A project drafter (Llama layers + a restricted head) becomes a LlamaForCausalLM
    sharing its decoder and wrapping its head; a transformers model is used as is.
    """
    vocab_ids = getattr(draft.model, "vocab_ids", None)
    if vocab_ids is None:
        return draft.model
    from transformers import LlamaForCausalLM

    config = draft.model.config
    with torch.device("meta"):
        assistant = LlamaForCausalLM(config)  # a shell: its own weights are replaced below
    assistant.model = draft.model.model
    assistant.lm_head = FullVocabularyHead(draft.model.lm_head, vocab_ids, config.vocab_size)
    return assistant.to(draft.dtype).eval()


@contextmanager
def counting_forwards(model: torch.nn.Module):
    """Yields a one-element list that counts the model's forward calls while inside."""
    count = [0]

    def hook(module, args, kwargs):
        count[0] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


class HfRunner:
    mode = "hf"

    def __init__(self, target: LoadedModel, tokenizer, draft: LoadedModel | None = None):
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        usable = draft is not None and not draft.needs_target_hidden_states
        self.assistant = hf_assistant(draft) if usable else None

    def skip_reason(self, method: str) -> str | None:
        """Why this runner cannot run `method` with its models, or None."""
        if method == "medusa":
            return "transformers' generate() has no Medusa decoding"
        if method == "lookahead":
            return "transformers' generate has no lookahead decoding"
        if method == "draft_model" and self.draft is not None and self.draft.needs_target_hidden_states:
            return ("transformers' assisted generation cannot use a feature draft "
                    "(it drafts from the target's hidden states, which generate() does not pass to an assistant)")
        return None

    def generate_kwargs(self, method: str) -> dict:
        if method == "autoregressive":
            return {}
        if method == "prompt_lookup":
            return {"prompt_lookup_num_tokens": PROMPT_LOOKUP_NUM_TOKENS}
        if method == "draft_model":
            if self.draft is None:
                raise ValueError("draft_model needs a draft model")
            if self.assistant is None:
                raise ValueError(self.skip_reason(method))
            return {"assistant_model": self.assistant}
        raise ValueError(f"unknown method {method!r}")

    def run(self, prompt: BenchPrompt, method: str, max_new_tokens: int, step_timings: bool = False) -> RunRecord:
        kwargs = self.generate_kwargs(method)
        began = time.perf_counter()
        prompt_ids = tokenize(build_request(messages=prompt.messages()), self.tokenizer)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)  # [1, P]
        with counting_forwards(self.target.model) as forwards, torch.inference_mode():
            output = self.target.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),  # [1, P]
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=min(self.target.eos_token_ids),
                **kwargs,
            )  # [1, P + generated]
        generated = output[0, len(prompt_ids):].tolist()
        text = self.tokenizer.decode(generated, skip_special_tokens=True)  # as a server would
        wall_s = time.perf_counter() - began
        del text
        return RunRecord(
            mode=self.mode,
            method=method,
            prompt_id=prompt.prompt_id,
            category=prompt.category,
            token_ids=cut_at_eos(generated, self.target.eos_token_ids),
            wall_s=wall_s,
            decode_steps=max(forwards[0] - 1, 0),  # prefill excluded
        )


def cut_at_eos(token_ids: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    """The tokens before the first EOS (HF includes the EOS and pads after it)."""
    for i, token in enumerate(token_ids):
        if token in eos_token_ids:
            return token_ids[:i]
    return token_ids
