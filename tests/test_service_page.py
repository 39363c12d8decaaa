"""The operator page at ``/`` in a real headless browser (Debian's Chromium driven by playwright): load
it, start a quantize job from its form, watch the job finish, open the new model's per-layer error
chart, activate it with the page's switch, and see the active model change; the causal LM slot too.

Skipped, with the reason, where /usr/bin/chromium or the playwright package is missing (CI installs
Chromium: see .ci/run). The store holds tiny random-weight models, so the job takes seconds."""

from __future__ import annotations

import os
import shutil

import pytest

import lowbit

from _tiny_hf import tiny_folder
from service_support import API_KEY, running_service

CHROMIUM = "/usr/bin/chromium"
# Without these, Chromium tries to reach Google's services and floods a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_WAIT_MS = 180_000  # a quantize job of a tiny encoder on a loaded 2-core machine (not a speed assert)
UI_WAIT_MS = 30_000  # the page polls every 1-3 s
ENC_ID, LM_ID, TARGET_ID = "tiny-enc", "tiny-lm", "tiny-enc-w8"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver); the operator "
                "page's browser test needs it", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extra) is not installed")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    from lowbit.models.hf import load_hf

    root = tmp_path_factory.mktemp("page")
    store = root / "store"
    lowbit.save(load_hf(str(tiny_folder("bert", root / "bert"))), store / ENC_ID)
    lowbit.save(load_hf(str(tiny_folder("llama", root / "llama"))), store / LM_ID)
    with running_service(store, register_default=False) as (service, url):
        yield service, url


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                    args=CHROMIUM_FLAGS)
        try:
            page = ctx.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            yield page, problems
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_operator_page_quantize_watch_activate(page_server, browser_page):
    service, url = page_server
    page, problems = browser_page
    expect = sync_api.expect
    page.goto(url + "/")
    expect(page.locator("#active-encoder")).to_have_text(ENC_ID, timeout=UI_WAIT_MS)
    expect(page.locator("#active-lm")).to_have_text("none")
    row = page.locator(f'#store tr[data-id="{ENC_ID}"]')
    expect(row).to_contain_text("available", timeout=UI_WAIT_MS)
    expect(row).to_contain_text("encoder")
    expect(page.locator(f'#store tr[data-id="{LM_ID}"]')).to_contain_text("causal-lm")

    # start a quantize job from the page's form, with the key typed in the page
    page.fill("#key", API_KEY)
    page.select_option("#q-source", ENC_ID)
    page.fill("#q-scheme", "w8a8-dynamic")
    page.fill("#q-target", TARGET_ID)
    page.click("#q-submit")
    expect(page.locator("#q-msg")).to_contain_text("queued", timeout=UI_WAIT_MS)
    job = page.locator("#jobs tbody tr").first
    expect(job).to_contain_text(f"{ENC_ID} → {TARGET_ID}", timeout=UI_WAIT_MS)
    expect(job.locator("td.status")).to_have_text("succeeded", timeout=JOB_WAIT_MS)
    assert service.jobs.list()[-1].status == "succeeded"

    # the new model appears in the store, quantized, with its fidelity and a per-layer error chart
    new = page.locator(f'#store tr[data-id="{TARGET_ID}"]')
    expect(new).to_contain_text("w8a8-dynamic", timeout=UI_WAIT_MS)
    expect(new).to_contain_text("cos ")
    new.locator("button.layers").click()
    expect(page.locator("#chart-title")).to_have_text(f"Per-layer error: {TARGET_ID}")
    bars = page.locator("#chart svg rect.bar")
    expect(bars.first).to_be_visible(timeout=UI_WAIT_MS)
    recorded = service.model_info(TARGET_ID)["metadata"]["fidelity"]["layers"]
    assert bars.count() == len(recorded) > 0

    # switch the encoder with the page's button: the active model changes on the page and in the service
    new.locator("button.activate").click()
    expect(page.locator("#active-encoder")).to_have_text(TARGET_ID, timeout=UI_WAIT_MS)
    expect(page.locator("#active-encoder-info")).to_contain_text("quantized")
    assert service.active.current().model_id == TARGET_ID

    # the causal LM slot is switched the same way, beside the encoder
    page.locator(f'#store tr[data-id="{LM_ID}"] button.activate').click()
    expect(page.locator("#active-lm")).to_have_text(LM_ID, timeout=UI_WAIT_MS)
    expect(page.locator("#active-lm-info")).to_contain_text("KV cache int8")
    expect(page.locator("#active-encoder")).to_have_text(TARGET_ID)

    # request rate and latency from /metrics
    expect(page.locator('#metrics tr[data-route="/models"]')).to_be_visible(timeout=UI_WAIT_MS)
    expect(page.locator("#totals")).to_contain_text("requests/s", timeout=UI_WAIT_MS)
    assert not problems, problems


def test_a_wrong_key_is_refused_and_shown(page_server, browser_page):
    service, url = page_server
    page, problems = browser_page
    expect = sync_api.expect
    page.goto(url + "/")
    before = service.active.current().model_id
    other = ENC_ID if before != ENC_ID else TARGET_ID
    page.fill("#key", "not-the-key")
    btn = page.locator(f'#store tr[data-id="{other}"] button.activate')
    expect(btn).to_be_enabled(timeout=UI_WAIT_MS)
    btn.click()
    expect(page.locator("#msg")).to_contain_text("401", timeout=UI_WAIT_MS)
    assert service.active.current().model_id == before
    assert [p for p in problems if "401" not in p] == []  # the browser logs the refused fetch itself


def test_the_switch_asks_for_the_key_when_none_is_typed(page_server, browser_page):
    service, url = page_server
    page, problems = browser_page
    expect = sync_api.expect
    page.goto(url + "/")
    page.fill("#key", "")
    asked: list[str] = []

    def answer(dialog):
        asked.append(dialog.message)
        dialog.accept(API_KEY)

    page.once("dialog", answer)
    before = service.active.current().model_id
    other = ENC_ID if before != ENC_ID else TARGET_ID
    btn = page.locator(f'#store tr[data-id="{other}"] button.activate')
    expect(btn).to_be_enabled(timeout=UI_WAIT_MS)
    btn.click()
    expect(page.locator("#active-encoder")).to_have_text(other, timeout=UI_WAIT_MS)
    assert asked and "API key" in asked[0]
    assert service.active.current().model_id == other
