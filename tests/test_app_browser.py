"""The chat window in a real browser: Debian's headless Chromium driven by Playwright.

Upload an image, send a message, watch the answer stream, stop it mid-answer, send a second turn.
The page's screenshot lands in test-artifacts/app_browser.png (and the test's tmp_path).
"""

import os
import shutil
import time

import pytest
from PIL import Image

from app_support import REPO, import_app, running_server

pytest.importorskip("gradio")
server = import_app("server")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PIECE_DELAY = 0.1  # slows the first answer so that there is time to press stop mid-answer
TIMEOUT_MS = 30_000


def chromium() -> str:
    path = os.environ.get("KIMIVL_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium executable (apt-get install chromium, or set KIMIVL_CHROMIUM)")
    return path


@pytest.fixture
def browser():
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def calls(tiny_model_fp32, monkeypatch):
    """Record generate() calls and the pieces each streamed; slow the first call down and make
    every call greedy so the run is deterministic."""
    real = tiny_model_fp32.generate
    log = []

    def generate(messages, **options):
        call = {"messages": messages, "options": options, "pieces": 0, "closed": False}
        log.append(call)
        try:
            for piece in real(messages, **{**options, "temperature": 0.0}):
                call["pieces"] += 1
                yield piece
                if len(log) == 1:
                    time.sleep(PIECE_DELAY)
        finally:
            call["closed"] = True

    monkeypatch.setattr(tiny_model_fp32, "generate", generate)
    return log


def wait_until(condition, what: str, timeout: float = TIMEOUT_MS / 1000):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_chat_in_the_browser(browser, tiny_model_fp32, calls, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (96, 64), (200, 80, 40)).save(image)
    tiny_model_fp32.engine.cache.reset()
    app = server.build_app(tiny_model_fp32)
    with running_server(app) as url, \
            browser.new_page(viewport={"width": 1280, "height": 860}) as page:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        box = page.locator("#input textarea")
        box.wait_for()

        page.set_input_files("#input input[type=file]", str(image))
        page.locator("#input .thumbnail-item img").wait_for()  # uploaded
        box.fill("Describe this image.")
        box.press("Enter")

        answer = page.locator("#chatbot .bot-row").last
        page.locator("#chatbot .user-row img").wait_for()
        wait_until(lambda: len(calls) == 1 and calls[0]["pieces"] >= 2, "the answer to start")
        first_seen = answer.inner_text()
        wait_until(lambda: len(answer.inner_text()) > len(first_seen) + 2, "the answer to grow")

        page.click("#stop")
        wait_until(lambda: calls[0]["closed"], "the generation to stop")
        page.locator("#chatbot .bot-row", has_text="stopped").wait_for()
        pieces = calls[0]["pieces"]
        stopped_text = answer.inner_text()
        time.sleep(3 * PIECE_DELAY)
        assert calls[0]["pieces"] == pieces and answer.inner_text() == stopped_text
        assert "first token" in stopped_text
        assert tiny_model_fp32.last_stats.finish_reason != "stop"  # cut short, not finished

        page.fill("#max-new-tokens input[type=number]", "16")
        page.press("#max-new-tokens input[type=number]", "Enter")
        box.fill("What colour is it?")
        box.press("Enter")
        wait_until(lambda: len(calls) == 2 and calls[1]["closed"], "the second answer")
        page.locator("#chatbot .bot-row").nth(1).filter(has_text="tokens").wait_for()

        messages, options = calls[1]["messages"], calls[1]["options"]
        assert options["max_new_tokens"] == 16
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[0]["content"][0]["type"] == "image"  # the image stays in the history
        assert messages[1]["content"]  # the stopped partial answer is kept
        assert page.locator("#chatbot .bot-row").count() == 2

        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        shot = tmp_path / "app_browser.png"
        page.screenshot(path=str(shot), full_page=True)
        shutil.copy(shot, artifacts / shot.name)
        assert shot.stat().st_size > 10_000
