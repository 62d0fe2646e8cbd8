"""The terminal chat loop behind `kimivl-local chat`: history, /image, /pdf, /video, /drop,
/reset, streaming. An attachment is checked when attached; one that is refused is not kept."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..errors import KimiVLError
from ..inputs.media import TAG, check_item, expand_item, pdf_item, video_item
from ..inputs.thinking import ThinkingSplitter

HELP = """commands:
  /image PATH          attach an image to your next message (repeatable)
  /pdf PATH [PAGES]    attach a PDF's pages (all, or e.g. 1-3,5) to your next message
  /video PATH          attach a video's sampled frames to your next message
  /drop                forget the attachments not sent yet (keeps the conversation)
  /reset               forget the conversation and attachments
  /help                this help
  /exit                leave (or Ctrl-D); Ctrl-C stops an answer"""

_PAGES = re.compile(r"[\d,-]+")


class ChatRepl:
    def __init__(self, model, system: str | None, sampling: dict, attachments: list[dict],
                 media_options: dict):
        """attachments: message items for the first message; media_options: text_layer, fps
        and max_frames for /pdf and /video."""
        self.model = model
        self.system = system
        self.sampling = sampling
        self.media_options = media_options
        # PDFs and videos are rendered once, when attached, and stay images in the history.
        self.pending = [x for item in attachments for x in self._expand(item)]
        self.history: list[dict] = []
        self.color = sys.stdout.isatty()

    def run(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("Kimi-VL chat. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    return 0
                continue
            self.answer(line)

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            print(HELP)
        elif name == "/drop":
            print(f"(dropped {self._pending_names()})" if self.pending else "(nothing attached)")
            self.pending.clear()
        elif name == "/reset":
            self.history.clear()
            self.pending.clear()
            print("(conversation cleared)")
        elif name in ("/image", "/pdf", "/video"):
            self.attach(name[1:], arg)
        else:
            print(f"unknown command {name}; /help lists them")
        return None

    def attach(self, kind: str, arg: str) -> None:
        pages = None
        if kind == "pdf":  # a trailing page range, unless it is part of the file's name
            head, _, tail = arg.rpartition(" ")
            if head and _PAGES.fullmatch(tail) and not Path(arg).expanduser().is_file():
                arg, pages = head.strip(), tail
        path = Path(arg).expanduser()
        if not arg:
            print(f"usage: /{kind} PATH" + (" [PAGES]" if kind == "pdf" else ""))
            return
        if not path.is_file():
            print(f"error: {kind} not found: {path}")
            return
        opts = self.media_options
        item = ({"type": "image", "image": str(path)} if kind == "image"
                else pdf_item(path, pages, opts["text_layer"]) if kind == "pdf"
                else video_item(path, opts["fps"], opts["max_frames"]))
        try:
            check_item(item)  # an image is decoded here, not at the next message
            if kind == "image":  # and its patch grid checked against this model
                self.model.processor.num_tokens(str(path))
            items = self._expand(item)
        except KimiVLError as exc:
            print(f"error: {exc} (not attached)")
            return
        self.pending += items
        if kind == "image":
            print(f"(attached {path.name}; it goes with your next message; /drop to undo)")
            return
        count = sum(1 for x in items if x.get("type") == "image")
        unit = ("page" if kind == "pdf" else "frame") + ("s" if count != 1 else "")
        print(f"(attached {path.name}: {count} {unit}; it goes with your next message; /drop to "
              "undo)")

    def _pending_names(self) -> str:
        """The pending attachments by file name: a PDF's or video's items count once."""
        names = [item[TAG][0].name if TAG in item else Path(str(item.get("image"))).name
                 for item in self.pending]
        return ", ".join(dict.fromkeys(names))

    def _expand(self, item: dict) -> list[dict]:
        return expand_item(item, self.model.processor, self.model.engine.max_context)

    def answer(self, text: str) -> None:
        content = list(self.pending)
        user = {"role": "user", "content": content + [{"type": "text", "text": text}]
                if content else text}
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        messages += self.history + [user]
        splitter, reply, shown = ThinkingSplitter(), [], "answer"
        try:
            for piece in self.model.generate(messages, **self.sampling):
                reply.append(piece)
                for channel, chunk in splitter.feed(piece):
                    shown = self._show(channel, chunk, shown)
            for channel, chunk in splitter.flush():
                shown = self._show(channel, chunk, shown)
        except KeyboardInterrupt:
            print("\n(stopped)", end="")
        except KimiVLError as exc:
            kept = " (the attachments wait for your next message; /drop forgets them)"
            print(f"error: {exc}{kept if self.pending else ''}")
            return  # the turn did not happen: keep history and attached images as they were
        if self.color:
            sys.stdout.write("\033[0m")
        print()
        self.pending.clear()
        self.history += [user, {"role": "assistant", "content": "".join(reply)}]
        s = self.model.last_stats
        print(f"[{s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s; "
              f"prompt {s.prompt_tokens} tokens, {s.prefill_tokens_per_second:.1f} tok/s]")

    def _show(self, channel: str, chunk: str, shown: str) -> str:
        if channel != shown and self.color:
            sys.stdout.write("\033[2m" if channel == "thinking" else "\033[0m")
        elif channel != shown:
            sys.stdout.write("[thinking] " if channel == "thinking" else "\n[answer] ")
        sys.stdout.write(chunk)
        sys.stdout.flush()
        return channel
