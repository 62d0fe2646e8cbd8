"""One model, one generation at a time: a FIFO of jobs run by a single worker thread.

The Gradio chat and the OpenAI routes both submit here, so they share one queue and one KV cache.
A job reports to its consumer through events: `Queued` while it waits (how many jobs are ahead),
`Piece` for each streamed text piece, then exactly one of `Finished` or `Failed`. Cancelling a
job drops it from the queue or stops its generation after the current token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

from kimivl_local.engine.generate import GenerationStats
from kimivl_local.errors import ContextLengthError, KimiVLError

log = logging.getLogger("kimivl_local.app")


@dataclass(frozen=True)
class Queued:
    ahead: int  # jobs that run before this one, the running one included


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats
    first_token_seconds: float | None  # from the start of the job to its first piece
    cancelled: bool


@dataclass(frozen=True)
class Failed:
    kind: str  # "input", "context", "memory" or "internal"
    message: str


Event = Queued | Piece | Finished | Failed


class QueueFullError(KimiVLError):
    """Too many requests are already waiting for the model."""


class Job:
    """A generation request; iterate `events()` (threads) or `aevents()` (asyncio) once."""

    def __init__(self, owner: GenerationQueue, messages: list[dict], options: dict,
                 loop: asyncio.AbstractEventLoop | None):
        self.messages = messages
        self.options = options
        self._owner = owner
        self._loop = loop
        self._events: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop waiting, or stop generating after the current token. Safe to call any time."""
        self._cancelled.set()
        self._owner.withdraw(self)

    def emit(self, event: Event) -> None:
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self._cancelled.set()

    def events(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def aevents(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


class GenerationQueue:
    """Runs `model.generate` for one job at a time, in submission order, on its own thread."""

    def __init__(self, model, max_waiting: int = 32):
        self.model = model
        self.max_waiting = max_waiting
        self._pending: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="kimivl-generate", daemon=True)
        self._thread.start()

    def submit(self, messages: list[dict], options: dict,
               loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a `model.generate(messages, **options)` call. Pass the running event loop to
        consume events with `aevents()`."""
        job = Job(self, messages, options, loop)
        with self._cond:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if len(self._pending) >= self.max_waiting:
                raise QueueFullError(f"the queue is full ({len(self._pending)} waiting for the "
                                     "model); try again later")
            self._pending.append(job)
            ahead = len(self._pending) - 1 + (self._running is not None)
            if ahead:
                job.emit(Queued(ahead))
            self._cond.notify_all()
        return job

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker thread."""
        with self._cond:
            self._closed = True
            jobs = list(self._pending) + ([self._running] if self._running else [])
            self._cond.notify_all()
        for job in jobs:
            job.cancel()
        self._thread.join(timeout)

    def withdraw(self, job: Job) -> None:
        """Take a cancelled job out of the queue (see Job.cancel)."""
        with self._cond:
            if job not in self._pending:
                return  # running (it stops at the next token) or already done
            self._pending.remove(job)
            self._announce_positions()
        job.emit(Finished(GenerationStats(), None, cancelled=True))

    def _announce_positions(self) -> None:
        for i, job in enumerate(self._pending):
            job.emit(Queued(i + (self._running is not None)))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._running = self._pending.popleft()
                self._announce_positions()
            try:
                self._generate(job)
            finally:
                with self._cond:
                    self._running = None
                    self._announce_positions()

    def _generate(self, job: Job) -> None:
        if job.cancelled:  # cancelled between leaving the queue and starting
            job.emit(Finished(GenerationStats(), None, cancelled=True))
            return
        start = time.perf_counter()
        first, stopped, stream = None, False, None
        try:
            stream = self.model.generate(job.messages, **job.options)
            for piece in stream:
                if first is None:
                    first = time.perf_counter() - start
                job.emit(Piece(piece))
                if job.cancelled:
                    stopped = True
                    break
        except ContextLengthError as exc:
            job.emit(Failed("context", str(exc)))
            return
        except KimiVLError as exc:
            job.emit(Failed("input", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - the server must survive any one request
            self._forget_cache()
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                job.emit(Failed("memory", "out of memory while generating; try fewer or smaller "
                                          "images, a shorter conversation, or a smaller "
                                          "--max-context"))
            else:
                log.exception("generation failed (a kernel error? run `kimivl-local selftest`)")
                job.emit(Failed("internal", f"internal error: {type(exc).__name__}: {exc}"))
            return
        finally:
            if stream is not None:
                stream.close()
        job.emit(Finished(replace(self.model.last_stats), first, cancelled=stopped))

    def _forget_cache(self) -> None:
        # A forward that failed half-way may have overwritten cached positions that the cache
        # still lists as valid; drop them so the next request recomputes its prompt.
        self.model.engine.cache.reset()
