"""The gateway's page in headless Chromium (the system's /usr/bin/chromium, driven by Playwright):
it streams an answer from the real stack with its accepted proposals marked, then the same prompt
plainly, and shows the figures. The screenshot is kept as the test's artefact."""

from __future__ import annotations

import shutil

import pytest

from specserve.client import build_request, connect, generate

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PROMPT = "List the planets of the solar system, one per line."


@pytest.fixture(scope="module")
def browser():
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_page_streams_marked_tokens_and_figures(browser, gateway_stack, tmp_path):
    channel, stub = connect(gateway_stack.address)
    with channel:
        expected = generate(stub, build_request(messages=[{"role": "user", "content": PROMPT}], method="draft_model",
                                                max_new_tokens=40, temperature=0.0), timeout_s=120)
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://{gateway_stack.http_address}/")
    page.fill("#prompt", PROMPT)
    page.select_option("#method", "draft_model")
    page.fill("#max-tokens", "40")
    page.click("#run")
    page.wait_for_selector("#spec[data-state=done]", timeout=60_000)
    page.wait_for_selector("#plain[data-state=done]", timeout=60_000)
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert not errors and page.is_hidden("#error")

    # Both answers are the target's own greedy text, the same the gRPC API gives.
    assert page.inner_text("#spec-output") == expected.text
    assert page.inner_text("#plain-output") == expected.text
    # The draft is the target's own model: proposals are accepted, and marked as such; the
    # target's own tokens (the first one and each bonus token) are marked too.
    accepted = page.eval_on_selector_all("#spec-output .tok.accepted", "spans => spans.map(s => s.textContent).join('')")
    own = page.eval_on_selector_all("#spec-output .tok.own", "spans => spans.length")
    assert accepted and own >= 1
    assert page.eval_on_selector_all("#plain-output .tok.accepted", "spans => spans.length") == 0

    figures = {name: page.inner_text(f"#{name}") for name in
               ("spec-tps", "spec-tau", "spec-acceptance", "spec-tokens", "plain-tps", "plain-tau", "plain-acceptance", "plain-tokens")}
    assert float(figures["spec-tps"]) > 0 and float(figures["plain-tps"]) > 0
    assert float(figures["spec-tau"]) == pytest.approx(expected.stats.mean_accepted_length, abs=0.01) and float(figures["spec-tau"]) > 1.5
    assert figures["spec-acceptance"] == "100%"
    assert figures["spec-tokens"] == figures["plain-tokens"] == "40"
    assert figures["plain-acceptance"] == "–"  # plain decoding proposes nothing
    assert "x the plain decoding" in page.inner_text("#summary")
