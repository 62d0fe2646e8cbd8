"""The chat window's handlers, driven directly (no browser) on the tiny synthetic checkpoint.

Random weights: answers are gibberish, so tests check structure (streaming, stats, history, errors,
stop, queue), not wording. Failures are simulated by replacing the model's generate().
"""

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from app_support import SETTINGS, import_app
from media_files import write_pdf, write_video

pytest.importorskip("gradio")
chat = import_app("chat")
handlers_mod = import_app("handlers")
worker = import_app("worker")

TIMEOUT = 30


def session(name="s1"):
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def model(tiny_model_fp32):
    tiny_model_fp32.engine.cache.reset()  # each test starts from a cold cache
    return tiny_model_fp32


@pytest.fixture
def queue(model):
    q = worker.GenerationQueue(model, max_waiting=4)
    yield q
    q.close()


@pytest.fixture
def handlers(queue):
    return handlers_mod.ChatHandlers(queue)


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 80, 40)).save(path)
    return str(path)


@pytest.fixture
def spy(model, monkeypatch):
    """Record each generate() call's messages and options, then run the real model."""
    calls = []
    real = model.generate

    def generate(messages, **options):
        calls.append((messages, options))
        return real(messages, **options)

    monkeypatch.setattr(model, "generate", generate)
    return calls


def send(handlers, turns, text, files=(), request=None, **settings):
    outputs = list(handlers.submit({"text": text, "files": list(files)}, turns,
                                   **{**SETTINGS, **settings}, request=request or session()))
    chatbot, turns, box = outputs[-1]
    return outputs, chatbot, turns, box


def test_submit_streams_an_answer_with_stats_and_keeps_history(handlers, image, spy):
    outputs, chatbot, turns, box = send(handlers, [], "What is in the picture?", [image])
    assert len(outputs) > 2  # queued/start, pieces, final stats
    assert box == {"text": "", "files": []}
    (turn,) = turns
    assert turn.answer and not turn.error and not turn.streaming
    assert turn.status.startswith("first token ") and "tok/s" in turn.status
    assert chatbot[0] == {"role": "user", "content": {"path": image}}
    assert chatbot[-1]["role"] == "assistant" and turn.status in chatbot[-1]["content"]
    messages, options = spy[0]
    assert messages[-1]["content"][0] == {"type": "image", "image": image}
    assert options == dict(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=8)

    _, _, turns, _ = send(handlers, turns, "And its colour?")
    messages, _ = spy[1]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == turn.answer
    assert "cached" in turns[1].status  # the first turn (image included) came from the KV cache


def test_bad_image_file_is_an_error_in_the_chat_and_left_out_of_history(handlers, tmp_path, spy):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    _, chatbot, turns, _ = send(handlers, [], "Look", [str(bad)])
    assert not spy  # refused when attached, by the same gate as the CLI's: the model never ran
    assert "not an image" in turns[0].error
    assert chatbot[-1]["content"].startswith("⚠ ")
    assert str(bad) not in chatbot[-1]["content"] and "broken.png" in chatbot[-1]["content"]

    _, _, turns, _ = send(handlers, turns, "Hello")
    assert turns[1].answer and not turns[1].error
    assert spy[-1][0] == [{"role": "user", "content": "Hello"}]  # the failed turn is not resent


def test_unsupported_file_type_never_reaches_the_model(handlers, tmp_path, spy):
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    _, chatbot, turns, _ = send(handlers, [], "Summarise", [str(notes)])
    assert "notes.txt: not a file type the model reads (attach images, PDFs or videos)" \
        in turns[0].error
    assert spy == []


def test_pdf_pages_and_video_frames_reach_the_model(handlers, tmp_path, spy):
    pdf = str(write_pdf(tmp_path / "report.pdf", [(200, 100, "one"), (200, 100, "two")]))
    video = str(write_video(tmp_path / "clip.mkv", frames=4, rate=2))
    _, _, turns, _ = send(handlers, [], "Compare", [pdf, video], pdf_pages="2", pdf_text=True)
    assert turns[0].answer and not turns[0].error
    items = spy[0][0][-1]["content"]
    assert items[0] == {"type": "pdf", "pdf": pdf, "pages": "2", "text_layer": True}
    assert items[1]["type"] == "video" and items[1]["video"] == video
    assert turns[0].status and "prompt" in turns[0].status

    _, chatbot, turns, _ = send(handlers, [], "Read it", [pdf], pdf_pages="5")
    assert "goes past the last page" in turns[0].error and "⚠" in chatbot[-1]["content"]


def test_prompt_too_long_for_the_context(handlers, spy):
    _, chatbot, turns, _ = send(handlers, [], "hello " * 9000)
    assert "context holds 8192" in turns[0].error
    _, _, turns, _ = send(handlers, turns, "short")
    assert turns[1].answer and not turns[1].error


def test_out_of_memory_is_reported_and_the_next_message_works(handlers, model, monkeypatch):
    real = model.generate
    send(handlers, [], "warm the cache")
    assert model.engine.cache.tokens

    def oom(messages, **options):
        yield "partial"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "generate", oom)
    _, chatbot, turns, _ = send(handlers, [], "Describe")
    assert turns[0].answer == "partial"
    assert turns[0].error.startswith("out of memory while generating")
    assert "⚠ out of memory" in chatbot[-1]["content"]
    assert model.engine.cache.tokens == []  # a half-done forward's cache is not trusted

    monkeypatch.setattr(model, "generate", real)
    _, _, turns, _ = send(handlers, turns, "again")
    assert turns[1].answer and not turns[1].error


def test_unexpected_error_is_reported_and_the_queue_survives(handlers, model, monkeypatch):
    def broken(messages, **options):
        raise ValueError("boom")
        yield  # a generator, like the real one

    monkeypatch.setattr(model, "generate", broken)
    _, _, turns, _ = send(handlers, [], "hi")
    assert turns[0].error == "internal error: ValueError: boom"
    monkeypatch.undo()
    _, _, turns, _ = send(handlers, [], "hi")
    assert turns[0].answer


class Endless:
    """A generate() that streams until it is closed, recording that it was."""

    def __init__(self):
        self.closed = threading.Event()
        self.pieces = 0

    def __call__(self, messages, **options):
        try:
            while True:
                self.pieces += 1
                yield "la "
                time.sleep(0.005)
        finally:
            self.closed.set()


def drive(generator) -> tuple[threading.Thread, list]:
    """Run a handler generator in a thread, collecting its outputs."""
    outputs = []
    thread = threading.Thread(target=lambda: outputs.extend(generator), daemon=True)
    thread.start()
    return thread, outputs


def wait_for(condition, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stop_ends_the_generation_itself(handlers, model, monkeypatch):
    endless = Endless()
    monkeypatch.setattr(model, "generate", endless)
    thread, outputs = drive(handlers.submit({"text": "go", "files": []}, [], **SETTINGS,
                                            request=session()))
    wait_for(lambda: endless.pieces > 3)
    handlers.stop(session("another page"))  # stops only its own session's answer
    time.sleep(0.05)
    assert not endless.closed.is_set()
    handlers.stop(session())
    thread.join(TIMEOUT)
    assert not thread.is_alive() and endless.closed.is_set()
    turns = outputs[-1][1]
    assert turns[0].status.endswith("stopped") and turns[0].answer.startswith("la la")
    count = endless.pieces
    time.sleep(0.05)
    assert endless.pieces == count


def test_second_chat_waits_in_a_visible_queue(handlers, model, monkeypatch):
    endless = Endless()
    real = model.generate
    monkeypatch.setattr(model, "generate",
                        lambda messages, **o: endless(messages) if messages[-1]["content"] == "long"
                        else real(messages, **o))
    first, _ = drive(handlers.submit({"text": "long", "files": []}, [], **SETTINGS,
                                     request=session("a")))
    wait_for(lambda: endless.pieces > 0)
    second, outputs = drive(handlers.submit({"text": "short", "files": []}, [], **SETTINGS,
                                            request=session("b")))
    wait_for(lambda: any("waiting for the model: 1 request ahead" in o[1][0].status
                         for o in list(outputs)))
    assert "waiting for the model" in outputs[-1][0][-1]["content"]  # shown in the chat
    handlers.stop(session("a"))
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    final = outputs[-1][1][0]
    assert final.answer and "tok/s" in final.status


def test_a_full_queue_is_an_error_in_the_chat(model, monkeypatch):
    endless = Endless()
    monkeypatch.setattr(model, "generate", endless)
    queue = worker.GenerationQueue(model, max_waiting=1)
    try:
        handlers = handlers_mod.ChatHandlers(queue)
        running = queue.submit([{"role": "user", "content": "x"}], {})
        wait_for(lambda: endless.pieces > 0)
        waiting = queue.submit([{"role": "user", "content": "y"}], {})
        _, _, turns, _ = send(handlers, [], "one more")
        assert turns[0].error == "the queue is full (1 waiting for the model); try again later"
        waiting.cancel()
        assert isinstance(list(waiting.events())[-1], worker.Finished)
        running.cancel()
    finally:
        queue.close()


def test_thinking_is_shown_apart_and_not_fed_back(handlers, model, monkeypatch):
    calls = []

    def thinker(messages, **options):
        calls.append(messages)
        yield from ["◁thi", "nk▷Let me look", " closely.◁/think", "▷ It is red."]

    monkeypatch.setattr(model, "generate", thinker)
    _, chatbot, turns, _ = send(handlers, [], "Colour?")
    assert turns[0].thinking == "Let me look closely." and turns[0].answer == "It is red."
    thought = chatbot[1]
    assert thought["metadata"] == {"title": "Thinking", "status": "done"}
    assert thought["content"] == "Let me look closely."
    assert chatbot[2]["content"].startswith("It is red.")

    send(handlers, turns, "Sure?")
    assert calls[1][1] == {"role": "assistant", "content": "It is red."}


def test_regenerate_edit_last_and_clear(handlers, model, image, monkeypatch):
    answers = iter(["first answer", "second answer"])
    calls = []

    def scripted(messages, **options):
        calls.append(messages)
        yield next(answers)

    monkeypatch.setattr(model, "generate", scripted)
    _, _, turns, _ = send(handlers, [], "Describe", [image])
    outputs = list(handlers.regenerate(turns, **SETTINGS, request=session()))
    chatbot, turns = outputs[-1]
    assert [t.answer for t in turns] == ["second answer"]
    assert calls[1] == calls[0]  # the same message, image included, asked again

    chatbot, turns, box = handlers.edit_last(turns, request=session())
    assert turns == [] and chatbot == []
    assert box == {"text": "Describe", "files": [image]}

    assert handlers.clear(request=session()) == ([], [], {"text": "", "files": []})


def test_edit_last_while_streaming_stops_first(handlers, model, monkeypatch):
    endless = Endless()
    monkeypatch.setattr(model, "generate", endless)
    thread, outputs = drive(handlers.submit({"text": "go", "files": []}, [], **SETTINGS,
                                            request=session()))
    wait_for(lambda: len(outputs) > 2)
    chatbot, turns, box = handlers.edit_last(outputs[-1][1], request=session())
    # edit_last returned only after the streaming handler sent its last update
    assert not thread.is_alive() and endless.closed.is_set()
    assert turns == [] and box["text"] == "go"


@pytest.mark.parametrize("path, config_temperature, expected", [
    ("Kimi-VL-A3B-Instruct", None, 0.2),
    ("Kimi-VL-A3B-Thinking-2506", None, 0.8),
    ("Kimi-VL-A3B-Thinking", 0.6, 0.6),
])
def test_default_sampling_follows_the_model(path, config_temperature, expected):
    model = SimpleNamespace(path=Path("/models") / path,
                            generation_config=SimpleNamespace(temperature=config_temperature,
                                                              top_p=None))
    settings = chat.default_settings(model)
    assert settings.temperature == expected and settings.top_p == 1.0
    assert settings.max_new_tokens == (4096 if "Thinking" in path else 512)


def test_unusable_sampling_settings(handlers, spy):
    """What no slider gives but Gradio's API passes (NaN is within every slider's bounds)."""
    *_, turns, _ = send(handlers, [], "hi", temperature=float("nan"))
    assert "sampling settings must be numbers" in turns[-1].error and spy == []
    *_, turns, _ = send(handlers, [], "hi", temperature=1e-300, top_p=0.0)
    assert turns[-1].ok  # too small to sample with: the sampler's greedy
    *_, turns, _ = send(handlers, [], "hi", temperature=-1.0)
    assert "temperature must be a finite number >= 0 (got -1.0)" in turns[-1].error
