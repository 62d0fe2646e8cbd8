"""The chat window's logic, apart from Gradio: turns, what the model sees, what the chatbot shows.

A `Turn` is one user message and the reply to it. The model is sent the successful turns' user
messages and answers only: a reasoning block is shown but never fed back, and a turn that failed
(a bad file, too long) is shown with its error but left out of later prompts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from kimivl_local.engine.generate import GenerationStats
from kimivl_local.errors import InputError
from kimivl_local.inputs.media import check_item, pdf_item, video_item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
FILE_TYPES = ["image", ".pdf", *VIDEO_SUFFIXES]  # what the upload button offers

@dataclass
class Turn:
    text: str
    files: list[str]
    content: str | list[dict]  # the user message content given to the model
    thinking: str = ""
    answer: str = ""
    status: str = ""  # the line under the answer: queue position while waiting, then stats
    error: str = ""
    streaming: bool = False

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Settings:
    system: str = ""
    temperature: float = 0.2
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    pdf_pages: str = ""
    pdf_text: bool = False

    def __post_init__(self):
        # Gradio gives None for an empty or hidden textbox.
        self.system = self.system or ""
        self.pdf_pages = (self.pdf_pages or "").strip()

    def options(self) -> dict:
        """generate() options; InputError for a value no slider gives (NaN, a string...)."""
        try:
            numbers = [float(x) for x in (self.temperature, self.top_p, self.top_k,
                                          self.max_new_tokens)]
        except (TypeError, ValueError):
            numbers = [math.nan]
        if not all(math.isfinite(x) for x in numbers):
            raise InputError("the sampling settings must be numbers")
        temperature, top_p, top_k, max_new_tokens = numbers
        return dict(temperature=temperature, top_p=top_p, top_k=int(top_k),
                    max_new_tokens=int(max_new_tokens))


def default_settings(model) -> Settings:
    """The publisher's sampling defaults: generation_config.json, else 0.2 for Instruct and 0.8
    (with room to think) for Thinking checkpoints."""
    thinking = "thinking" in str(model.path).lower()
    gc = model.generation_config
    return Settings(
        temperature=gc.temperature if gc.temperature is not None else (0.8 if thinking else 0.2),
        top_p=gc.top_p if gc.top_p is not None else 1.0,
        max_new_tokens=4096 if thinking else 512,
    )


def new_turn(text: str, files: list[str], settings: Settings) -> Turn:
    """The turn for a message; an attachment the model cannot take becomes the turn's error."""
    items, problems = [], []
    for path in files:
        suffix = os.path.splitext(path)[1].lower()
        if suffix in IMAGE_SUFFIXES:
            item = {"type": "image", "image": path}
        elif suffix == ".pdf":
            item = pdf_item(path, settings.pdf_pages or None, settings.pdf_text)
        elif suffix in VIDEO_SUFFIXES:
            item = video_item(path)
        else:
            problems.append(f"{os.path.basename(path)}: not a file type the model reads "
                            "(attach images, PDFs or videos)")
            continue
        try:  # the same gate as the CLI's: a broken file is refused here, not by the worker
            check_item(item)
        except InputError as exc:  # named by the file's own name, never the server's path
            name = os.path.basename(path)
            message = str(exc).replace(path, name)
            problems.append(message if name in message else f"{name}: {message}")
            continue
        items.append(item)
    content = items + [{"type": "text", "text": text}] if items else text
    return Turn(text, list(files), content, error="; ".join(problems))


def model_messages(turns: list[Turn], system: str) -> list[dict]:
    """The conversation as the model sees it, ending with the last turn's user message."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for turn in turns[:-1]:
        if turn.ok:
            messages += [{"role": "user", "content": turn.content},
                         {"role": "assistant", "content": turn.answer}]
    return messages + [{"role": "user", "content": turns[-1].content}]


def render(turns: list[Turn]) -> list[dict]:
    """Chatbot messages (Gradio's messages format) for the turns."""
    out = []
    for turn in turns:
        out += [{"role": "user", "content": _attachment(path, turn.content)} for path in turn.files]
        if turn.text:
            out.append({"role": "user", "content": _folded(turn.text)})
        if turn.thinking:
            done = turn.answer or not turn.streaming
            out.append({"role": "assistant", "content": turn.thinking,
                        "metadata": {"title": "Thinking", "status": "done" if done else "pending"}})
        body = turn.answer
        if turn.thinking and not body and not turn.streaming and not turn.error:
            body = "*No answer: the reply ended while still thinking.*"
        if turn.error:
            body += ("\n\n" if body else "") + f"⚠ {_without_paths(turn.error, turn.files)}"
        if turn.status:
            body += ("\n\n" if body else "") + f"<sub>{turn.status}</sub>"
        if body or turn.streaming:
            out.append({"role": "assistant", "content": body or "…"})
    return out


def _attachment(path: str, content: str | list[dict]) -> str | dict:
    """An image or video is shown as itself; a PDF as its name and the pages the model reads."""
    pdf = next((item for item in content if isinstance(item, dict) and item.get("pdf") == path),
               None) if isinstance(content, list) else None
    if pdf is None:
        return {"path": path}
    pages = f"pages {pdf['pages']}" if pdf.get("pages") else "all pages"
    text_layer = " + text layer" if pdf.get("text_layer") else ""
    return f"**{_escape(os.path.basename(path))}** · PDF, {pages}{text_layer}"


FOLD_LINES = 12  # a user message longer than this is shown folded (a pasted document, a log)
FOLD_CHARS = 1500


def _folded(text: str) -> str:
    """A long message collapsed to its first line; the whole text opens on click."""
    lines = text.splitlines()
    if len(lines) <= FOLD_LINES and len(text) <= FOLD_CHARS:
        return text
    first = _escape(lines[0][:80]) if lines else ""
    size = f"{len(lines)} lines, {len(text):,} characters"
    return f"<details><summary>{first}… ({size})</summary>\n\n{text}\n\n</details>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") \
        .replace("*", "\\*").replace("_", "\\_")


def stats_line(stats: GenerationStats, first_token_seconds: float | None, cancelled: bool) -> str:
    parts = []
    if first_token_seconds is not None:
        parts.append(f"first token {first_token_seconds:.2f} s")
    if stats.generated_tokens > 1:
        parts.append(f"{stats.decode_tokens_per_second:.1f} tok/s")
    parts.append(f"{stats.generated_tokens} tokens")
    if stats.prompt_tokens:
        cached = f", {stats.reused_tokens} cached" if stats.reused_tokens else ""
        parts.append(f"prompt {stats.prompt_tokens}{cached}")
    if cancelled:
        parts.append("stopped")
    elif stats.finish_reason == "length":
        parts.append("reached max new tokens")
    elif stats.finish_reason == "context":
        parts.append("context full")
    return " · ".join(parts)


def _without_paths(message: str, files: list[str]) -> str:
    # Uploads live under Gradio's cache folder; the file's own name is what the user knows.
    for path in files:
        message = message.replace(path, os.path.basename(path))
    return message
