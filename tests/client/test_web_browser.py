"""The chat page in a real browser: `chat-web` in its own process, Debian's Chromium driven by Playwright, a
real server behind it. Without Chromium the test is skipped (and says why); on CI (CI=true) that is a failure,
because .ci/run installs Chromium first."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from service.config import SamplingDefaults
from tests.support import until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DEFAULTS = SamplingDefaults(temperature=0.0, max_new_tokens=300)  # greedy: the answers are reproducible


def missing(reason: str) -> None:
    """Skip, or on CI fail: CI must run this test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser test")
    pytest.skip(reason)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("Chromium is not installed (`apt-get install chromium`; .ci/run does it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"{url} never answered")


@pytest.fixture(scope="module")
def page_server(start_server):
    return start_server({"defaults": DEFAULTS})


@pytest.fixture(scope="module")
def web(page_server, tmp_path_factory):
    """`chat-web --target <server> --port <free>`; its URL. Its output goes to chat-web.log in a tmp dir."""
    port = free_port()
    log = tmp_path_factory.mktemp("chat-web") / "chat-web.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "client.web.launch", "--target", page_server.address,
                                    "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        print(log.read_text())  # shown when the test fails


@pytest.fixture
def browser_page():
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (the `test` extra)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def ask(page, text: str) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def answers(page):
    return page.locator('[data-testid="stChatMessage"]:has([data-testid="stChatMessageAvatarAssistant"])')


def test_chat_in_a_browser_with_history_and_stop(web, page_server, browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(web)
    expect(page.get_by_test_id("stChatInputTextArea")).to_be_visible(timeout=60_000)
    expect(page.get_by_text(page_server.engine.loaded.name).first).to_be_visible()

    ask(page, "What is the capital of France?")
    expect(answers(page).nth(0)).to_contain_text("Paris", timeout=90_000)
    expect(answers(page).nth(0)).to_contain_text("finish: stop", timeout=90_000)

    ask(page, "And of Germany?")  # only the first turn says this is about capitals
    expect(answers(page).nth(1)).to_contain_text("Berlin", timeout=90_000)
    expect(answers(page).nth(1)).to_contain_text("finish: stop", timeout=90_000)

    ask(page, "Write a very long story about a dragon who learns to fly.")
    third = answers(page).nth(2)
    expect(third).to_contain_text("dragon", timeout=90_000)
    page.wait_for_function(  # let some of the answer arrive, then stop it
        "() => { const m = document.querySelectorAll('[data-testid=\"stChatMessage\"]'); "
        "return m.length >= 6 && m[5].innerText.length > 150; }", timeout=90_000)
    third.get_by_role("button", name="Stop").click()  # ours, not Streamlit's own in the page header
    expect(third).to_contain_text("stopped", timeout=30_000)
    kept = third.locator('[data-testid="stMarkdownContainer"]').first.inner_text()
    assert "dragon" in kept.lower() and len(kept) > 100
    stats = page_server.engine.stats
    assert page_server.call(until(lambda: stats.running == 0 and stats.waiting == 0, timeout=10))  # row freed
    time.sleep(1.5)
    assert third.locator('[data-testid="stMarkdownContainer"]').first.inner_text() == kept  # nothing more came
    assert page.get_by_test_id("stChatMessage").get_by_role("button", name="Stop").count() == 0

    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("CHAT_WEB_SCREENSHOT"):  # to refresh the README's picture
        shutil.copy(shot, os.environ["CHAT_WEB_SCREENSHOT"])
