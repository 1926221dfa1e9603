"""Prometheus metrics, scraped from every service of a real stack while requests run: the counters
move exactly as the requests did (their own stats say how much)."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MESSAGES = [{"role": "user", "content": "Count from one to twenty in words."}]


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the /metrics at address, by (sample name, labels)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def client(gateway_stack):
    return openai.OpenAI(base_url=f"http://{gateway_stack.http_address}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def addresses(gateway_stack):
    return {**gateway_stack.metrics_addresses, "gateway": gateway_stack.http_address}


def scrape_all(addresses) -> dict[str, dict]:
    return {name: scrape(address) for name, address in addresses.items()}


def settled(addresses) -> dict[str, dict]:
    """A scrape once no request is in flight anywhere: a server counts a request as it ends,
    which can be just after its client has read the last message."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape_all(addresses)
        busy = (value(samples["orchestrator"], "specserve_orchestrator_active_requests")
                + value(samples["target"], "specserve_target_active_sessions")
                + value(samples["draft"], "specserve_draft_active_sessions")
                + value(samples["gateway"], "specserve_gateway_active_requests"))
        if busy == 0:
            return samples
        assert time.monotonic() < deadline, "requests still in flight after their clients finished"
        time.sleep(0.05)


def test_counters_move_as_the_requests_did(client, addresses):
    before = settled(addresses)
    speculative = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=max_tokens, temperature=0,
                                                  extra_body={"speculation": {"method": "draft_model", "num_speculative_tokens": 3}})
                   for max_tokens in (12, 17)]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0,
                                           extra_body={"speculation": {"method": "autoregressive"}})
    streamed = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    lookup_stats = streamed[-1].model_extra["speculation"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    after = settled(addresses)

    def delta(service, name, **labels):
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    stats = [r.model_extra["speculation"] for r in speculative]
    every = [*stats, plain.model_extra["speculation"], lookup_stats]
    o = "specserve_orchestrator_"
    assert delta("orchestrator", o + "requests_total", method="draft_model", outcome="ok") == 2
    assert delta("orchestrator", o + "requests_total", method="autoregressive", outcome="ok") == 1
    assert delta("orchestrator", o + "requests_total", method="prompt_lookup", outcome="ok") == 1
    assert delta("orchestrator", o + "requests_total", method="prompt_lookup", outcome="invalid_argument") == 1
    assert delta("orchestrator", o + "generated_tokens_total", method="draft_model") == 12 + 17
    assert delta("orchestrator", o + "proposed_tokens_total", method="draft_model") == sum(s["proposed_tokens"] for s in stats) > 0
    assert delta("orchestrator", o + "accepted_tokens_total", method="draft_model") == sum(s["accepted_tokens"] for s in stats) > 0
    assert delta("orchestrator", o + "time_to_first_token_seconds_count", method="draft_model") == 2
    # accepted_length: one observation per decoding pass of the target, of the tokens it produced.
    assert delta("orchestrator", o + "accepted_length_count", method="draft_model") == sum(s["target_forward_passes"] - 1 for s in stats)
    assert delta("orchestrator", o + "accepted_length_sum", method="draft_model") == (12 - 1) + (17 - 1)
    assert delta("orchestrator", o + "time_per_output_token_seconds_count", method="autoregressive") == 9 - 1
    assert value(after["orchestrator"], o + "active_requests") == 0

    t, decoding_passes = "specserve_target_", sum(s["target_forward_passes"] - 1 for s in every)
    assert delta("target", t + "step_duration_seconds_count", op="start") == 4
    assert delta("target", t + "step_duration_seconds_count", op="verify") == decoding_passes
    assert delta("target", t + "sessions_total", outcome="ok") == 4
    assert value(after["target"], t + "active_sessions") == 0 and value(after["target"], t + "queued_ops") == 0
    d = "specserve_draft_"
    assert delta("draft", d + "step_duration_seconds_count", op="start") == 2
    # A propose op before each verification, but for a last one that has room for one token only.
    proposes = delta("draft", d + "step_duration_seconds_count", op="propose")
    assert sum(s["target_forward_passes"] - 2 for s in stats) <= proposes <= sum(s["target_forward_passes"] - 1 for s in stats)

    g = "specserve_gateway_"
    assert delta("gateway", g + "http_requests_total", route="/v1/chat/completions", status="200") == 3
    assert delta("gateway", g + "http_requests_total", route="/v1/completions", status="200") == 1
    assert delta("gateway", g + "http_requests_total", route="/v1/chat/completions", status="400") == 1
    assert delta("gateway", g + "accepted_tokens_total", method="draft_model") == sum(s["accepted_tokens"] for s in stats)
    assert delta("gateway", g + "generated_tokens_total", method="autoregressive") == 9


def test_gauges_during_a_stream_and_a_client_that_leaves(client, addresses):
    before = scrape_all(addresses)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=400, temperature=0, stream=True,
                                            extra_body={"speculation": {"method": "autoregressive"}})
    chunks = iter(stream)
    next(chunks), next(chunks)  # the role, then the first token: generation is under way
    during = scrape_all(addresses)
    assert value(during["orchestrator"], "specserve_orchestrator_active_requests") == 1
    assert value(during["target"], "specserve_target_active_sessions") == 1
    assert value(during["gateway"], "specserve_gateway_active_requests") == 1
    stream.close()  # the client goes away mid-answer
    deadline = time.monotonic() + 20
    while True:
        now = scrape_all(addresses)
        if value(now["target"], "specserve_target_active_sessions") == 0 and value(now["gateway"], "specserve_gateway_active_requests") == 0:
            break
        assert time.monotonic() < deadline, "the session was not freed after the client left"
        time.sleep(0.1)
    cancelled = ("specserve_orchestrator_requests_total", frozenset({"method": "autoregressive", "outcome": "cancelled"}.items()))
    assert now["orchestrator"].get(cancelled, 0) - before["orchestrator"].get(cancelled, 0) == 1
    generated = ("specserve_orchestrator_generated_tokens_total", frozenset({"method": "autoregressive"}.items()))
    assert now["orchestrator"][generated] - before["orchestrator"].get(generated, 0) < 400


def test_ngram_pool_hits_are_counted(client, addresses):
    prompt = "Lists of things: apples, rivers, violins, telescopes, and"
    name = "specserve_orchestrator_ngram_pool_lookups_total"
    before = scrape(addresses["orchestrator"])
    client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    time.sleep(0.5)  # the pool is written after the request ends, off its critical path
    middle = scrape(addresses["orchestrator"])
    # The same prompt again: the greedy output repeats, so the pool holds its continuations.
    client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    after = scrape(addresses["orchestrator"])
    assert value(after, name, result="hit") - value(middle, name, result="hit") >= 1
    assert value(after, name, result="hit") + value(after, name, result="miss") > value(before, name, result="hit") + value(before, name, result="miss")
