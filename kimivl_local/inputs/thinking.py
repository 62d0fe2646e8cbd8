"""Thinking models write `◁think▷ reasoning ◁/think▷ answer` as plain text; split it."""

from __future__ import annotations

from collections.abc import Iterator

THINK_OPEN = "◁think▷"
THINK_CLOSE = "◁/think▷"


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a complete reply; thinking is "" when there is none."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        if THINK_OPEN in text:  # still thinking: all of it is reasoning
            return text.split(THINK_OPEN, 1)[1].strip(), ""
        return "", text
    return head.replace(THINK_OPEN, "", 1).strip(), tail.lstrip()


class ThinkingSplitter:
    """Streaming version: feed text pieces, get (channel, text) with channel "thinking" or
    "answer"; a marker cut across pieces is held back until it is complete."""

    def __init__(self):
        self._buffer = ""
        self._channel = "answer"
        self._seen_open = False

    def feed(self, piece: str) -> Iterator[tuple[str, str]]:
        self._buffer += piece
        while True:
            marker = THINK_CLOSE if self._channel == "thinking" else THINK_OPEN
            if self._channel == "answer" and self._seen_open:
                marker = None  # only one thinking block, at the start
            idx = self._buffer.find(marker) if marker else -1
            if idx >= 0:
                if idx:
                    yield self._channel, self._buffer[:idx]
                self._buffer = self._buffer[idx + len(marker):]
                self._seen_open = True
                self._channel = "answer" if self._channel == "thinking" else "thinking"
                continue
            keep = _partial_marker_suffix(self._buffer, marker) if marker else 0
            emit = self._buffer[:len(self._buffer) - keep]
            if emit:
                yield self._channel, emit
            self._buffer = self._buffer[len(emit):]
            return

    def flush(self) -> Iterator[tuple[str, str]]:
        if self._buffer:
            yield self._channel, self._buffer
        self._buffer = ""


def _partial_marker_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
