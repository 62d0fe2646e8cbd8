"""The terminal chat loop behind `kimivl-local chat`: history, /image, /reset, streaming."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import KimiVLError
from .thinking import ThinkingSplitter

HELP = """commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        forget the conversation and attached images
  /help         this help
  /exit         leave (or Ctrl-D); Ctrl-C stops an answer"""


class ChatRepl:
    def __init__(self, model, system: str | None, sampling: dict, images: list[Path]):
        self.model = model
        self.system = system
        self.sampling = sampling
        self.pending_images = list(images)
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
        elif name == "/reset":
            self.history.clear()
            self.pending_images.clear()
            print("(conversation cleared)")
        elif name == "/image":
            path = Path(arg).expanduser()
            if not arg:
                print("usage: /image PATH")
            elif not path.is_file():
                print(f"error: image not found: {path}")
            else:
                self.pending_images.append(path)
                print(f"(attached {path.name}; it goes with your next message)")
        else:
            print(f"unknown command {name}; /help lists them")
        return None

    def answer(self, text: str) -> None:
        content = [{"type": "image", "image": str(p)} for p in self.pending_images]
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
            print(f"error: {exc}")
            return  # the turn did not happen: keep history and attached images as they were
        if self.color:
            sys.stdout.write("\033[0m")
        print()
        self.pending_images.clear()
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
