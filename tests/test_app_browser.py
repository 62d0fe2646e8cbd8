"""The chat window in a real browser: Debian's headless Chromium driven by Playwright.

Upload an image, send a message, watch the answer stream, stop it mid-answer, send a second turn;
a Thinking model's reasoning (forced through the sampler, see thinking_support) shown collapsed,
cut by max new tokens and by stop; the polish points (footer, stop button, PDF caption, folded
prompt, image toolbar). Screenshots land in test-artifacts/ (git-ignored) for a person to check.
"""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import kimivl_local
from app_support import REPO, import_app, running_server
from media_files import write_pdf
from kimivl_local.synthetic.checkpoint import write_checkpoint
from thinking_support import LONG_REASONING, scripted_replies, thinking_reply

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


ARTIFACTS = REPO / "test-artifacts"


def save_shot(page, name: str, **options) -> Path:
    """Screenshot into test-artifacts/ (git-ignored), for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **options)
    assert path.stat().st_size > 2_000
    return path


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    """A tiny checkpoint in the Kimi-VL-A3B-Thinking-2506 layout."""
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-thinking",
                            preset="tiny-thinking")
    return kimivl_local.load(path, device="cpu", dtype=torch.float32)


@pytest.fixture
def thinking_calls(thinking_model, monkeypatch):
    """Record generate() calls; a call whose options carry max_new_tokens > SLOW_ABOVE streams
    slowly, so that there is time to see it running and press stop."""
    real = thinking_model.generate
    log = []

    def generate(messages, **options):
        call = {"messages": messages, "options": options, "pieces": 0, "closed": False}
        log.append(call)
        try:
            for piece in real(messages, **options):
                call["pieces"] += 1
                yield piece
                if options["max_new_tokens"] > SLOW_ABOVE:
                    time.sleep(PIECE_DELAY)
        finally:
            call["closed"] = True

    monkeypatch.setattr(thinking_model, "generate", generate)
    return log


SLOW_ABOVE = 1000


def set_max_new_tokens(page, n: int) -> None:
    page.fill("#max-new-tokens input[type=number]", str(n))
    page.press("#max-new-tokens input[type=number]", "Enter")


def send(page, text: str) -> None:
    box = page.locator("#input textarea")
    box.fill(text)
    box.press("Enter")


def sent_texts(messages: list[dict]) -> str:
    """Everything in a prompt's messages, as one string."""
    return " ".join(m["content"] if isinstance(m["content"], str) else
                    " ".join(str(x.get("text", "")) for x in m["content"]) for m in messages)


def test_thinking_model_in_the_browser(browser, thinking_model, thinking_calls, monkeypatch):
    """Reasoning is shown apart and collapsed; a reply cut while thinking (by max new tokens, by
    stop) is shown as reasoning with its answer marked missing; no reasoning is sent back."""
    scripted_replies(monkeypatch, thinking_model,
                     thinking_reply("The picture is red all over.", "It is **red**."),
                     thinking_reply(LONG_REASONING, None),
                     thinking_reply(LONG_REASONING, None),
                     "Fine, red.")
    thinking_model.engine.cache.reset()
    app = server.build_app(thinking_model)
    with running_server(app) as url, \
            browser.new_page(viewport={"width": 1280, "height": 1000}) as page:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#input textarea").wait_for()
        stop = page.locator("#stop")
        assert stop.is_disabled()  # nothing is generating yet
        assert page.locator("#temperature input[type=number]").input_value() == "0.8"
        rows = page.locator("#chatbot .bot-row")

        set_max_new_tokens(page, 512)
        send(page, "What colour is it?")
        rows.first.filter(has_text="tokens").wait_for()
        thought = rows.first.locator(".thought-group .title", has_text="Thinking")
        thought.wait_for()
        assert "It is red." in rows.first.inner_text()
        wait_until(lambda: "The picture is red" not in rows.first.inner_text(), "it to collapse", 5)
        save_shot(page, "thinking_collapsed.png")
        thought.click()  # opens on demand
        rows.first.get_by_text("The picture is red all over.").wait_for()
        page.wait_for_timeout(500)  # the panel slides open
        save_shot(page, "thinking_opened.png")
        thought.click()

        set_max_new_tokens(page, 32)  # the second reply runs out while still thinking
        send(page, "Think harder.")
        rows.nth(1).filter(has_text="reached max new tokens").wait_for()
        assert "No answer: the reply ended while still thinking." in rows.nth(1).inner_text()
        # collapsed once done (it was open, streaming, while pending)
        wait_until(lambda: "step 0 checks" not in rows.nth(1).inner_text(), "it to collapse", 5)

        set_max_new_tokens(page, 2048)  # the third streams slowly: stop it while it thinks
        send(page, "And again.")
        rows.nth(2).get_by_text("step 1 checks", exact=False).wait_for()  # open while thinking
        assert stop.is_enabled()
        save_shot(page, "generating_stop_active.png")
        stop.click()
        wait_until(lambda: thinking_calls[2]["closed"], "the generation to stop")
        rows.nth(2).filter(has_text="stopped").wait_for()
        page.wait_for_function("() => document.querySelector('#stop').disabled")
        assert "No answer: the reply ended while still thinking." in rows.nth(2).inner_text()
        save_shot(page, "thinking_cut.png", full_page=True)

        set_max_new_tokens(page, 512)
        send(page, "So?")
        rows.nth(3).filter(has_text="Fine, red.").wait_for()
        rows.nth(3).filter(has_text="tokens").wait_for()
        assert rows.count() == 4

    later = [call["messages"] for call in thinking_calls[1:]]
    for messages in later:
        assert "◁" not in sent_texts(messages) and "step 0" not in sent_texts(messages)
    assert [m["content"] for m in later[-1] if m["role"] == "assistant"] == ["It is **red**.", "", ""]


def covering(page, selector: str) -> str:
    """What the user would click at the centre of the element: its aria-label, or the tag."""
    return page.evaluate("""(sel) => {
        const r = document.querySelector(sel).getBoundingClientRect();
        const e = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        const b = e && e.closest('button');
        return b ? (b.getAttribute('aria-label') || b.textContent.trim()) : (e ? e.tagName : '');
    }""", selector)


def gap(page, target: str, others: str) -> float:
    """The smallest distance in pixels between the target element and any of the others."""
    return page.evaluate("""([target, others]) => {
        const a = document.querySelector(target).getBoundingClientRect();
        let best = Infinity;
        for (const e of document.querySelectorAll(others)) {
            const b = e.getBoundingClientRect();
            const dx = Math.max(0, b.left - a.right, a.left - b.right);
            const dy = Math.max(0, b.top - a.bottom, a.top - b.bottom);
            best = Math.min(best, Math.hypot(dx, dy));
        }
        return best;
    }""", [target, others])


def test_app_polish_in_the_browser(browser, tiny_model_fp32, calls, tmp_path):
    """No developer settings in the footer; an attached PDF shows its name and pages; a long
    pasted prompt is folded; image toolbars never cover the chat's delete (clear) icon."""
    image = tmp_path / "wide.png"
    Image.new("RGB", (1600, 900), (200, 80, 40)).save(image)
    pdf = write_pdf(tmp_path / "report.pdf", [(300, 200, "One"), (300, 200, "Two"),
                                              (300, 200, "Three")])
    pasted = "\n".join(f"log line {i}: all good" for i in range(40))
    tiny_model_fp32.engine.cache.reset()
    app = server.build_app(tiny_model_fp32)
    with running_server(app) as url, \
            browser.new_page(viewport={"width": 1280, "height": 860}) as page:
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#input textarea").wait_for()
        assert page.locator("footer").count() == 0
        assert page.get_by_text("Settings", exact=True).count() == 0

        set_max_new_tokens(page, 16)  # `calls` slows the first answer down
        page.fill("#pdf-pages textarea", "2-3")
        page.set_input_files("#input input[type=file]", [str(image), str(pdf)])
        page.locator("#input .thumbnail-item").nth(1).wait_for()
        send(page, "Summarise this log:\n" + pasted)
        wait_until(lambda: len(calls) == 1 and calls[0]["closed"], "the answer")
        page.locator("#chatbot .bot-row").filter(has_text="tokens").wait_for()

        user = page.locator("#chatbot .user-row")
        user.filter(has_text="report.pdf · PDF, pages 2-3").wait_for()
        pdf_item = next(x for x in calls[0]["messages"][-1]["content"] if x["type"] == "pdf")
        assert pdf_item["pages"] == "2-3"  # what the caption says is what the model read
        fold = user.locator("details")
        assert fold.count() == 1 and fold.get_attribute("open") is None
        assert "Summarise this log:… (41 lines" in fold.inner_text()
        assert "log line 39" not in user.last.inner_text()  # folded away
        page.wait_for_timeout(300)
        save_shot(page, "polish_pdf_and_folded_prompt.png")

        # The wide image's toolbar (fullscreen) sits at the bubble's top right, under the chat's
        # delete icon once the chat scrolls: the icon must stay on top and clickable.
        page.set_viewport_size({"width": 900, "height": 600})
        clear = "#chatbot button[aria-label=Clear]"
        wrap = page.locator("#chatbot .bubble-wrap")
        assert wrap.evaluate("e => e.scrollHeight > e.clientHeight + 100")  # it scrolls
        for top in range(0, 400, 10):
            wrap.evaluate(f"e => e.scrollTop = {top}")
            assert covering(page, clear) == "Clear", f"scrolled {top}px"
            assert gap(page, clear, "#chatbot .image-container .top-panel button") > 24, f"scrolled {top}px"
        page.locator("#chatbot .bubble-wrap").evaluate("e => e.scrollTop = 0")
        page.locator("#chatbot .user-row img").first.hover()
        page.wait_for_timeout(300)
        save_shot(page, "polish_image_toolbar.png")

        user.locator("summary").click()
        user.get_by_text("log line 39", exact=False).wait_for()
        page.set_viewport_size({"width": 1280, "height": 860})
        save_shot(page, "polish_prompt_unfolded.png", full_page=True)
