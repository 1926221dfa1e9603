"""Benchmark harness: every method side by side, through the served stack, in process and in HF.

`specserve bench` (see cli.py). Modules:
- prompts: loading Spec-Bench / MT-Bench / HumanEval / GSM8K records, balanced subsets;
- runners: one generation through the gRPC stack, in this process (core loop), or HF `generate`;
- aggregate: per-method and per-category statistics (medians, geometric means, exact match);
- simulated: fixed-latency models with a set acceptance rate, for orchestration overhead;
- overhead, concurrency: the two secondary experiments;
- report: results.json, results.md, chart.png.
"""
