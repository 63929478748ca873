"""The operator web page (/ui) in headless Chromium, against a real stack and the Ollama stand-in.

The browser is Debian's chromium (/usr/bin/chromium, or $CHROMIUM) driven by Playwright's Python
package; no browser is downloaded. Waits use Playwright's ``expect`` with timeouts, never sleeps.
The screenshot test writes its picture (1280x800) to a temporary file, or to the path in
MODELPOOL_SCREENSHOT: `MODELPOOL_SCREENSHOT=docs/ui.png bin/test tests/test_ui.py -k screenshot`
refreshes the README's picture (a test run never changes a tracked file by itself).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Locator, Page, ViewportSize, expect

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until

VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
#: Seconds the stand-in holds a load so that WARMING is on screen long enough to be seen.
WARMING_HOLD = 10.0

MODELS: list[dict[str, Any]] = [
    {
        "model_id": "qwen2.5-coder:7b",
        "display_name": "Qwen2.5 Coder 7B",
        "model_type": "code",
        "memory_mb": 4700,
        "tags": ["code"],
    },
    {
        "model_id": "llama3.1:8b",
        "display_name": "Llama 3.1 8B",
        "warmup": True,
        "memory_mb": 4900,
        "tags": ["chat"],
    },
    {"model_id": "tiny:1b", "display_name": "Tiny 1B", "memory_mb": 800},
    {"model_id": "mistral:7b", "display_name": "Mistral 7B", "memory_mb": 4100},
    {
        "model_id": "library/llama3.1:8b",
        "display_name": "Llama 3.1 8B (library)",
        "upstream_model": "llama3.1:8b",
        "memory_mb": 4900,
    },
    {"model_id": "ghost:1b", "display_name": "Ghost 1B (not pulled)", "memory_mb": 900},
]
#: The stand-in learns mistral:7b; it never learns ghost:1b, whose load therefore fails.
EXTRA_STANDIN_MODELS = {"mistral:7b": 4_100_000_000}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack], standin: OllamaStandin) -> Iterator[Stack]:
    added = {k: v for k, v in EXTRA_STANDIN_MODELS.items() if k not in standin.models}
    standin.models.update(added)
    try:
        yield make_stack(MODELS, {"memory_limit_mb": 16000})
    finally:
        for name in added:
            standin.models.pop(name, None)


def require_page(stack: Stack) -> None:
    """Fail clearly when the control plane does not serve the page (publicly)."""
    resp = requests.get(stack.url + "/ui", timeout=10)
    assert resp.status_code != 404, (
        "GET /ui answered 404: the page's blueprint is not registered "
        "(app.register_blueprint(controlplane.ui.bp) in controlplane/app.py)"
    )
    assert resp.status_code != 401, (
        "GET /ui answered 401: the page and its static files (/ui, /ui/static/...) must be "
        "exempt from the api_key check (settings.public_paths)"
    )
    assert resp.status_code == 200 and "<title>Model Pool</title>" in resp.text, resp.text[:300]


@contextmanager
def open_page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh browser context on the stack's page; uncaught script errors fail the test."""
    require_page(stack)
    context = browser.new_context(viewport=VIEWPORT)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(stack.url + "/", wait_until="domcontentloaded")
        expect(page).to_have_url(re.compile(r"/ui$"))
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page's script: {errors}"


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    with open_page(browser, stack) as opened:
        yield opened


# --- helpers ----------------------------------------------------------------------------------


def row(page: Page, model_id: str) -> Locator:
    return page.locator(f'tr[data-model="{model_id}"]')


def state_cell(page: Page, model_id: str) -> Locator:
    return row(page, model_id).locator('[data-field="state"]')


RECORDER = """() => {
  window.__states = {};
  const note = () => {
    for (const tr of document.querySelectorAll("tr[data-model]")) {
      const id = tr.dataset.model;
      const text = tr.querySelector('[data-field="state"]').textContent.trim();
      const seen = (window.__states[id] = window.__states[id] || []);
      if (seen[seen.length - 1] !== text) seen.push(text);
    }
  };
  note();
  new MutationObserver(note).observe(document.querySelector("#models-body"), {
    subtree: true, childList: true, characterData: true,
  });
}"""


def record_states(page: Page) -> None:
    """Record every state each row shows from now on (see ``seen_states``)."""
    page.evaluate(RECORDER)


def seen_states(page: Page, model_id: str) -> list[str]:
    states: list[str] = page.evaluate("(id) => window.__states[id] || []", model_id)
    return states


def chat(port: int, model: str) -> None:
    resp = requests.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text


# --- tests ------------------------------------------------------------------------------------


def test_page_lists_models_and_load_goes_warming_then_hot(
    page: Page, stack: Stack, standin: OllamaStandin
) -> None:
    for m in MODELS:
        expect(row(page, m["model_id"])).to_have_count(1, timeout=10_000)
    expect(page.locator("#models-body tr[data-model]")).to_have_count(len(MODELS))
    expect(row(page, "tiny:1b").locator(".model-name")).to_have_text("Tiny 1B")
    expect(state_cell(page, "tiny:1b")).to_have_text("COLD")
    expect(row(page, "tiny:1b").locator('[data-field="ttl"]')).to_have_text("-")
    # The warmup model is HOT for good; the summary counts it.
    expect(state_cell(page, "llama3.1:8b")).to_have_text("HOT", timeout=30_000)
    expect(row(page, "llama3.1:8b").locator('[data-field="ttl"]')).to_have_text("forever")
    expect(page.locator("#pool-status")).to_have_text("healthy")
    expect(page.locator("#pool-total")).to_have_text(str(len(MODELS)))
    expect(page.locator("#pool-memory")).to_contain_text("/ 16,000 MB")

    record_states(page)
    delay = standin.load_delay
    standin.load_delay = 1.5  # long enough for WARMING to be on screen, whatever the timing
    try:
        row(page, "tiny:1b").locator('[data-action="load"]').click()
        expect(state_cell(page, "tiny:1b")).to_have_text("WARMING", timeout=5_000)
        expect(state_cell(page, "tiny:1b")).to_have_text("HOT", timeout=30_000)
    finally:
        standin.load_delay = delay
    assert seen_states(page, "tiny:1b") == ["COLD", "WARMING", "HOT"]
    assert stack.state("tiny:1b") == "HOT"
    port = stack.model("tiny:1b")["port"]
    link = row(page, "tiny:1b").locator('[data-field="endpoint"] a')
    expect(link).to_have_text(f"127.0.0.1:{port}")
    expect(link).to_have_attribute("href", f"http://127.0.0.1:{port}/health")
    # The TTL counts down between polls (default TTL 5 min in the test stack).
    ttl = row(page, "tiny:1b").locator('[data-field="ttl"]')
    expect(ttl).to_have_text(re.compile(r"^[45]m \d\ds$"))
    first = ttl.inner_text()
    expect(ttl).not_to_have_text(first, timeout=3_000)
    # Requests straight to the worker show up in the table.
    chat(port, "tiny:1b")
    expect(row(page, "tiny:1b").locator('[data-field="requests"]')).to_have_text("1", timeout=5_000)


def test_extend_ttl_then_unload_goes_unloading_then_cold(page: Page, stack: Stack) -> None:
    if stack.state("tiny:1b") != "HOT":
        stack.load("tiny:1b")
    tiny = row(page, "tiny:1b")
    expect(state_cell(page, "tiny:1b")).to_have_text("HOT", timeout=10_000)
    before = stack.model("tiny:1b")["ttl_remaining_minutes"]
    tiny.locator('input[name="extend-minutes"]').fill("20")
    tiny.locator('[data-action="extend"]').click()
    expect(page.locator("#message")).to_contain_text("TTL of tiny:1b extended by 20 min")
    assert stack.model("tiny:1b")["ttl_remaining_minutes"] > before + 19
    expect(tiny.locator('[data-field="ttl"]')).to_have_text(re.compile(r"^2[45]m \d\ds$"))

    record_states(page)
    tiny.locator('[data-action="unload"]').click()
    expect(state_cell(page, "tiny:1b")).to_have_text("COLD", timeout=30_000)
    assert seen_states(page, "tiny:1b") == ["HOT", "UNLOADING", "COLD"]
    assert stack.state("tiny:1b") == "COLD"
    expect(tiny.locator('[data-field="endpoint"]')).to_have_text("-")
    expect(tiny.locator('[data-action="unload"]')).to_be_disabled()
    expect(tiny.locator('[data-action="load"]')).to_be_enabled()


def test_invalid_setting_is_shown_next_to_its_field(page: Page, stack: Stack) -> None:
    before = stack.get("/config").json()
    field = page.locator('[name="max_concurrent_models"]')
    expect(field).to_have_value(str(before["max_concurrent_models"]), timeout=10_000)
    field.fill("0")
    page.locator("#save-config").click()
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_class(re.compile(r"\bfield-error\b"))
    error = page.locator('[data-key="max_concurrent_models"] .error-text')
    expect(error).to_be_visible()
    expect(error).to_have_text("max_concurrent_models: 0 is below the minimum 1")
    expect(page.locator("#message")).to_contain_text("max_concurrent_models: 0 is below")
    assert stack.get("/config").json() == before

    # A nested key: the message names port_range.end, and only that input is marked.
    field.fill(str(before["max_concurrent_models"]))
    expect(field).not_to_have_attribute("aria-invalid", "true")
    end = page.locator('[name="port_range.end"]')
    end.fill(str(before["port_range"]["start"] - 1))
    page.locator("#save-config").click()
    expect(end).to_have_attribute("aria-invalid", "true")
    expect(page.locator('[name="port_range.start"]')).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator('[data-key="port_range"] .error-text')).to_contain_text("port_range.end: ")
    assert stack.get("/config").json() == before

    # A valid change is saved, and only the changed key is sent.
    page.locator("#reload-config").click()
    expect(end).to_have_value(str(before["port_range"]["end"]))
    interval = page.locator('[name="check_interval_seconds"]')
    interval.fill("20")
    with page.expect_request(lambda r: r.method == "PATCH") as patch:
        page.locator("#save-config").click()
    assert patch.value.post_data_json == {"check_interval_seconds": 20}
    expect(page.locator("#message")).to_contain_text("Settings saved: check_interval_seconds")
    assert stack.get("/config").json() == {**before, "check_interval_seconds": 20.0}
    interval.fill(str(before["check_interval_seconds"]))
    with page.expect_response(lambda r: r.request.method == "PATCH") as saved:
        page.locator("#save-config").click()
    assert saved.value.status == 200
    expect(page.locator("#save-config")).to_be_disabled()
    assert stack.get("/config").json() == before


def test_register_form_shows_the_servers_message(page: Page, stack: Stack) -> None:
    form = page.locator("#register-form")
    form.locator('[name="model_id"]').fill("remote:1b")
    form.locator('[name="backend"]').select_option("openai")
    page.locator("#register-submit").click()
    expect(page.locator("#register-error")).to_have_text(
        "model.upstream_url: required for backend openai"
    )
    expect(form.locator('[name="upstream_url"]')).to_have_attribute("aria-invalid", "true")
    assert stack.get("/models/remote:1b").status_code == 404


def test_screenshot_of_models_in_every_state(
    page: Page, stack: Stack, standin: OllamaStandin, tmp_path: Path
) -> None:
    wanted = os.environ.get("MODELPOOL_SCREENSHOT")
    screenshot = Path(wanted).resolve() if wanted else tmp_path / "ui.png"
    # HOT with traffic, HOT for good (warmup), FAILED, WARMING, and COLD models.
    hot = stack.load("qwen2.5-coder:7b")
    for _ in range(3):
        chat(hot["port"], "qwen2.5-coder:7b")
    expect(state_cell(page, "qwen2.5-coder:7b")).to_have_text("HOT", timeout=10_000)
    expect(state_cell(page, "llama3.1:8b")).to_have_text("HOT", timeout=30_000)
    row(page, "ghost:1b").locator('[data-action="load"]').click()
    expect(state_cell(page, "ghost:1b")).to_have_text("FAILED", timeout=30_000)
    expect(row(page, "ghost:1b").locator(".err")).not_to_be_empty()

    delay = standin.load_delay
    standin.load_delay = WARMING_HOLD
    try:
        row(page, "mistral:7b").locator('[data-action="load"]').click()
        expect(state_cell(page, "mistral:7b")).to_have_text("WARMING", timeout=5_000)
    finally:
        standin.load_delay = delay
    expect(row(page, "qwen2.5-coder:7b").locator('[data-field="requests"]')).to_have_text(
        "3", timeout=5_000
    )
    expect(page.locator("#pool-active")).to_have_text("2", timeout=5_000)
    expect(page.locator("#pool-models-sub")).to_contain_text("1 warming", timeout=5_000)
    page.evaluate("document.querySelector('#message').hidden = true")  # a steady picture
    page.mouse.move(0, 0)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    # Written here rather than by Playwright (whose file writes run on an executor thread).
    screenshot.write_bytes(page.screenshot(animations="disabled"))
    assert state_cell(page, "mistral:7b").inner_text() == "WARMING"
    assert screenshot.stat().st_size > 10_000
    for model_id in ("tiny:1b", "library/llama3.1:8b"):
        assert state_cell(page, model_id).inner_text() == "COLD"
    # Leave the stack settled: the held load finishes within WARMING_HOLD.
    stack.wait_state("mistral:7b", "HOT", "FAILED", timeout=WARMING_HOLD + 30)


def test_api_key_is_asked_for_on_401(browser: Browser, make_stack: Callable[..., Stack]) -> None:
    secured = make_stack([{"model_id": "tiny:1b", "display_name": "Tiny 1B"}], {"api_key": "k"})
    assert requests.get(secured.url + "/models", timeout=10).status_code == 401
    with open_page(browser, secured) as page:
        prompt = page.locator("#auth-form")
        expect(prompt).to_be_visible(timeout=10_000)
        expect(row(page, "tiny:1b")).to_have_count(0)
        # A wrong key is refused and asked for again.
        page.locator("#auth-key").fill("wrong")
        page.locator("#auth-submit").click()
        expect(prompt).to_be_visible(timeout=5_000)
        expect(page.locator("#auth-hint")).to_contain_text("did not accept")

        with page.expect_request(
            lambda r: r.url.endswith("/models") and r.method == "GET"
        ) as listed:
            page.locator("#auth-key").fill("k")
            page.locator("#auth-submit").click()
        assert listed.value.headers.get("authorization") == "Bearer k"
        expect(prompt).to_be_hidden()
        expect(state_cell(page, "tiny:1b")).to_have_text("COLD", timeout=10_000)
        # The settings show the key hidden, and the actions carry the key.
        expect(page.locator('[name="api_key"]')).to_have_value("***")
        row(page, "tiny:1b").locator('[data-action="load"]').click()
        expect(state_cell(page, "tiny:1b")).to_have_text("HOT", timeout=30_000)
        assert page.evaluate("sessionStorage.getItem('modelpool.apiKey')") == "k"
        expect(prompt).to_be_hidden()
    wait_until(lambda: secured.get("/health").json()["active_models"] == 1, timeout=5)
