"""Ways to run one generation: through the gRPC stack, in this process with the core loop, or HF generate.

Each runner has `run(prompt, method, max_new_tokens) -> RunRecord`, greedy decoding.
"""
