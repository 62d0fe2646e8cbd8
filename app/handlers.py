"""The chat window's event handlers. Plain generators over (chatbot, turns, ...) values, so tests
drive them without a browser; ui.py wires them to Gradio components.

Every handler takes the browser session (Gradio injects its gr.Request; tests pass anything with
a `session_hash`) so that the stop button reaches the generation its own page started.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from gradio import Request

from kimivl_local.errors import InputError
from kimivl_local.inputs.thinking import ThinkingSplitter

from .chat import Settings, Turn, model_messages, new_turn, render, stats_line
from .worker import Failed, Finished, GenerationQueue, Job, Piece, QueueFullError, Queued

EMPTY_BOX = {"text": "", "files": []}


class ChatHandlers:
    def __init__(self, queue: GenerationQueue):
        self.queue = queue
        self._jobs: dict[str, Job] = {}  # the running or waiting job of each browser session
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def submit(self, box: dict | None, turns: list[Turn], system: str, temperature: float,
               top_p: float, top_k: int, max_new_tokens: int, pdf_pages: str, pdf_text: bool,
               request: Request) -> Iterator[tuple[list[dict], list[Turn], dict]]:
        """Send the textbox's text and files; stream (chatbot, turns, textbox) updates."""
        box = box or EMPTY_BOX
        text, files = (box.get("text") or "").strip(), list(box.get("files") or [])
        if (not text and not files) or self._busy(request):
            yield render(turns), turns, box  # nothing to send, or an answer is still streaming
            return
        settings = Settings(system, temperature, top_p, top_k, max_new_tokens, pdf_pages, pdf_text)
        turns = turns + [new_turn(text, files, settings)]
        for chatbot, turns in self._answer(turns, settings, request):
            yield chatbot, turns, EMPTY_BOX

    def regenerate(self, turns: list[Turn], system: str, temperature: float, top_p: float,
                   top_k: int, max_new_tokens: int, pdf_pages: str, pdf_text: bool,
                   request: Request) -> Iterator[tuple[list[dict], list[Turn]]]:
        """Answer the last message again, with the current settings (PDF pages included)."""
        if not turns or self._busy(request):
            yield render(turns), turns
            return
        settings = Settings(system, temperature, top_p, top_k, max_new_tokens, pdf_pages, pdf_text)
        redo = new_turn(turns[-1].text, turns[-1].files, settings)
        yield from self._answer(turns[:-1] + [redo], settings, request)

    def edit_last(self, turns: list[Turn], request: Request) -> tuple[list[dict], list[Turn], dict]:
        """Take the last message back into the textbox (stopping its answer) to edit and resend."""
        self._stop_and_wait(request)
        if not turns:
            return render(turns), turns, EMPTY_BOX
        last = turns[-1]
        return render(turns[:-1]), turns[:-1], {"text": last.text, "files": list(last.files)}

    def clear(self, request: Request) -> tuple[list[dict], list[Turn], dict]:
        self._stop_and_wait(request)
        return [], [], EMPTY_BOX

    def stop(self, request: Request) -> None:
        with self._lock:
            job = self._jobs.get(request.session_hash)
        if job is not None:
            job.cancel()

    def generating(self, request: Request) -> bool:
        """Whether this session's answer is waiting or streaming."""
        return self._busy(request)

    def _stop_and_wait(self, request: Request, timeout: float = 30.0) -> None:
        """Stop this session's answer and wait until its handler has sent its last update, so
        that update cannot overwrite what the caller returns."""
        self.stop(request)
        with self._idle:
            self._idle.wait_for(lambda: request.session_hash not in self._jobs, timeout)

    def _busy(self, request: Request) -> bool:
        with self._lock:
            return request.session_hash in self._jobs

    def _answer(self, turns: list[Turn], settings: Settings,
                request: Request) -> Iterator[tuple[list[dict], list[Turn]]]:
        turn = turns[-1]
        if not turn.ok:
            yield render(turns), turns
            return
        try:
            job = self.queue.submit(model_messages(turns, settings.system), settings.options())
        except (QueueFullError, InputError) as exc:
            turn.error = str(exc)
            yield render(turns), turns
            return
        with self._lock:
            self._jobs[request.session_hash] = job
        turn.streaming = True
        splitter = ThinkingSplitter()
        try:
            yield render(turns), turns
            for event in job.events():
                if isinstance(event, Queued):
                    turn.status = (f"waiting for the model: {event.ahead} request"
                                   f"{'s' if event.ahead > 1 else ''} ahead")
                elif isinstance(event, Piece):
                    turn.status = ""
                    _add(turn, splitter.feed(event.text))
                elif isinstance(event, Finished):
                    _add(turn, splitter.flush())
                    turn.streaming = False
                    turn.status = stats_line(event.stats, event.first_token_seconds,
                                             event.cancelled)
                elif isinstance(event, Failed):
                    turn.streaming = False
                    turn.status = ""
                    turn.error = event.message
                yield render(turns), turns
        finally:
            turn.streaming = False
            job.cancel()  # a no-op once finished; stops the model if the page went away
            with self._idle:
                if self._jobs.get(request.session_hash) is job:
                    del self._jobs[request.session_hash]
                self._idle.notify_all()


def _add(turn: Turn, chunks) -> None:
    for channel, text in chunks:
        if channel == "thinking":
            turn.thinking += text if turn.thinking else text.lstrip()
        else:
            turn.answer += text if turn.answer else text.lstrip()
