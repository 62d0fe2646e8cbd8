"""The chat window's handling of Thinking replies cut short, and the message rendering polish
(attached PDFs, long pasted prompts), without a browser (test_app_browser.py has the browser)."""

import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")

from app_support import SETTINGS, import_app
from image_bytes import encoded
from media_files import write_pdf

chat = import_app("chat")
handlers_mod = import_app("handlers")
worker = import_app("worker")

NO_ANSWER = "*No answer: the reply ended while still thinking.*"
REQUEST = SimpleNamespace(session_hash="s1")


@pytest.fixture
def handlers(tiny_model_fp32):
    tiny_model_fp32.engine.cache.reset()
    queue = worker.GenerationQueue(tiny_model_fp32, max_waiting=4)
    yield handlers_mod.ChatHandlers(queue)
    queue.close()


def scripted(model, monkeypatch, replies, delay=0.0):
    """Replace generate() with scripted piece lists; record the messages of each call."""
    calls, replies = [], iter(replies)

    def generate(messages, **options):
        calls.append(messages)
        for piece in next(replies):
            yield piece
            time.sleep(delay)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def send(handlers, turns, text):
    *_, (chatbot, turns, _) = handlers.submit({"text": text, "files": []}, turns, **SETTINGS,
                                              request=REQUEST)
    return chatbot, turns


def test_reply_that_ends_while_thinking_is_marked_and_not_sent_back(handlers, tiny_model_fp32,
                                                                     monkeypatch):
    calls = scripted(tiny_model_fp32, monkeypatch,
                     [["◁think▷", "Let me", " see"], ["Yes."]])
    chatbot, turns = send(handlers, [], "Colour?")
    assert turns[0].thinking == "Let me see" and turns[0].answer == ""
    assert chatbot[1]["metadata"] == {"title": "Thinking", "status": "done"}
    assert chatbot[2]["content"].startswith(NO_ANSWER)
    chatbot, turns = send(handlers, turns, "And?")
    assert calls[1][1] == {"role": "assistant", "content": ""}  # no reasoning, no marker
    assert chatbot[-1]["content"].startswith("Yes.")


def test_stopped_while_thinking_and_the_stop_state(handlers, tiny_model_fp32, monkeypatch):
    scripted(tiny_model_fp32, monkeypatch, [["◁think▷"] + ["step "] * 500], delay=0.01)
    assert not handlers.generating(REQUEST)
    outputs = []
    thread = threading.Thread(target=lambda: outputs.extend(handlers.submit(
        {"text": "go", "files": []}, [], **SETTINGS, request=REQUEST)))
    thread.start()
    deadline = time.monotonic() + 30
    while not (outputs and outputs[-1][1][0].thinking):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert handlers.generating(REQUEST)  # what keeps the stop button active
    while_thinking = outputs[-1][0][1]
    assert while_thinking["metadata"]["status"] == "pending"
    handlers.stop(REQUEST)
    thread.join(30)
    assert not handlers.generating(REQUEST)
    chatbot, turns, _ = outputs[-1]
    assert turns[0].answer == "" and "stopped" in chatbot[2]["content"]
    assert chatbot[2]["content"].startswith(NO_ANSWER)


def test_streaming_reasoning_has_no_answer_marker_yet():
    turn = chat.Turn("q", [], "q", thinking="hmm", streaming=True)
    assert [m["content"] for m in chat.render([turn])] == ["q", "hmm", "…"]


def test_pdf_attachment_shows_its_name_and_pages(tmp_path):
    # Real files: attachments pass the input gate when the turn is made.
    pdf = str(write_pdf(tmp_path / "report.pdf", [(200, 100, None)] * 3))
    cat = tmp_path / "cat.png"
    cat.write_bytes(encoded("PNG"))
    for pages, text, caption in [("2-3", False, "**report.pdf** · PDF, pages 2-3"),
                                 ("", True, "**report.pdf** · PDF, all pages + text layer")]:
        settings = chat.Settings(pdf_pages=pages, pdf_text=text)
        turn = chat.new_turn("Sum up", [pdf, str(cat)], settings)
        assert not turn.error
        shown = chat.render([turn])
        assert shown[0]["content"] == caption
        assert shown[1]["content"] == {"path": str(cat)}


def test_long_prompts_are_folded_short_ones_are_not():
    short = "\n".join(["line"] * chat.FOLD_LINES)
    assert chat.render([chat.Turn(short, [], short)])[0]["content"] == short
    long = "<b>*head*</b>\n" + "\n".join(f"line {i}" for i in range(chat.FOLD_LINES))
    shown = chat.render([chat.Turn(long, [], long)])[0]["content"]
    assert shown.startswith("<details><summary>&lt;b&gt;\\*head\\*&lt;/b&gt;… (13 lines, ")
    assert long in shown and shown.endswith("</details>")
    one_line = "x" * (chat.FOLD_CHARS + 1)
    assert "<details>" in chat.render([chat.Turn(one_line, [], one_line)])[0]["content"]
