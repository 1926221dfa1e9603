"""Peer: llama.cpp's own decoding of the same GGUF file (llama-cpp-python's `Llama`), same
prompt tokens, same threads, in this process.

Methods: "autoregressive" (its greedy `generate` loop: the tool a CPU user would pick) and
"prompt_lookup" (its `LlamaPromptLookupDecoding` draft, 10 tokens). Target forward passes
are not observable through its API, so tau is left empty. A GGUF model only (a packaged
model or a .gguf file)."""

from __future__ import annotations

import os
import time

from specserve.bench.prompts import BenchPrompt
from specserve.bench.records import RunRecord
from specserve.client import build_request
from specserve.generation.requests import tokenize
from specserve.runtime.models import gguf_file

PROMPT_LOOKUP_NUM_TOKENS = 10
CONTEXT_TOKENS = 4096
# Its prompt lookup keeps logits of every position (context x vocabulary floats): a smaller window.
LOOKUP_CONTEXT_TOKENS = 2048


class LlamaCppRunner:
    mode = "llama_cpp"

    def __init__(self, spec: str, tokenizer, threads: int = 0):
        from llama_cpp import Llama

        path = gguf_file(spec)
        if path is None:
            raise ValueError(f"model {spec!r}: the llama.cpp peer needs a GGUF model")
        threads = threads or len(os.sched_getaffinity(0))
        self.tokenizer = tokenizer
        self.models = {}

        def make(method: str):
            draft = None
            if method == "prompt_lookup":
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                draft = LlamaPromptLookupDecoding(num_pred_tokens=PROMPT_LOOKUP_NUM_TOKENS)
            n_ctx = LOOKUP_CONTEXT_TOKENS if draft is not None else CONTEXT_TOKENS
            return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         draft_model=draft, verbose=False)

        self._make = make

    def skip_reason(self, method: str) -> str | None:
        if method not in ("autoregressive", "prompt_lookup"):
            return "llama-cpp-python has no draft-model decoding through its Python API"
        return None

    def _model(self, method: str):
        if method not in self.models:
            self.models[method] = self._make(method)
        return self.models[method]

    def run(self, prompt: BenchPrompt, method: str, max_new_tokens: int, step_timings: bool = False) -> RunRecord:
        llm = self._model(method)
        began = time.perf_counter()
        prompt_ids = tokenize(build_request(messages=prompt.messages()), self.tokenizer)
        llm.reset()  # no KV reuse from the previous prompt: every runner starts from an empty cache
        generated: list[int] = []
        for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if llm.token_eos() == token or token in self._eos(llm):
                break
            generated.append(int(token))
            if len(generated) >= max_new_tokens:
                break
        self.tokenizer.decode(generated, skip_special_tokens=True)  # as a server would
        wall_s = time.perf_counter() - began
        return RunRecord(mode=self.mode, method=method, prompt_id=prompt.prompt_id, category=prompt.category,
                         token_ids=generated, wall_s=wall_s)

    @staticmethod
    def _eos(llm) -> frozenset[int]:
        import llama_cpp

        cached = getattr(llm, "_specserve_eog", None)
        if cached is None:
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            cached = frozenset(t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t))
            llm._specserve_eog = cached
        return cached

    def close(self) -> None:
        for llm in self.models.values():
            llm.close()
        self.models = {}
