"""One model, one worker thread: requests run one at a time, in the order they arrived.

The event loop never runs the model. A request becomes a Job: a function that returns an iterator
(model.stream_chat, model.stream...), queued FIFO for the worker thread, which iterates it (the C core
releases the GIL) and hands each item to the event loop through an asyncio.Queue with
loop.call_soon_threadsafe. Job.cancel() (a client went away) is checked between items and between
chunks of the prompt, and the iterator is closed, so the engine moves on to the next request at once.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, Callable, Iterator

_ITEM, _ERROR, _DONE = 0, 1, 2


class JobCancelled(Exception):
    """Raised inside the worker (from the progress callback) to stop a cancelled job's prompt."""


class Job:
    """A queued request. Iterate it on the event loop (`async for item in job`); the worker's exceptions
    are raised there. cancel() may be called from any thread, at any time."""

    _ids = itertools.count(1)

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[["Job"], Iterator[Any]]):
        self.id = next(self._ids)
        self.work = work
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._finished = False

    # ---- any thread
    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def progress(self, done: int, total: int) -> None:
        """The progress callback to pass to Model.stream/stream_chat: stops a cancelled prompt between
        chunks."""
        if self._cancelled.is_set():
            raise JobCancelled()

    # ---- worker thread
    def _put(self, kind: int, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    # ---- event loop
    async def next(self):
        """The next item; StopAsyncIteration when the job is over; the worker's exception if it failed."""
        if self._finished:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        if kind == _ITEM:
            return value
        self._finished = True
        if kind == _ERROR:
            raise value
        raise StopAsyncIteration

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.next()


class Engine:
    """Runs jobs on one model, one at a time, in submission order, on a worker thread."""

    def __init__(self, model, name: str = "flashmoe-engine"):
        self.model = model
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._closed = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- state, for /health
    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(
        self, work: Callable[[Job], Iterator[Any]], loop: asyncio.AbstractEventLoop | None = None
    ) -> Job:
        """Queue work(job) -> iterator; returns the Job to iterate on the event loop."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        job = Job(loop or asyncio.get_running_loop(), work)
        self._jobs.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        cur = self._current
        if cur is not None:
            cur.cancel()
        pending = []
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            job.cancel()
            job._put(_DONE)
        self._jobs.put(None)
        self._thread.join(timeout)

    # ---- worker
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:  # the client left while queued
                self.counts["cancelled"] += 1
                job._put(_DONE)
                continue
            self._current = job
            it = None
            try:
                it = job.work(job)
                for item in it:
                    if job.cancelled:
                        break
                    job._put(_ITEM, item)
                self.counts["cancelled" if job.cancelled else "completed"] += 1
            except JobCancelled:
                self.counts["cancelled"] += 1
            except Exception as exc:  # handed to the request, which answers with an error
                if job.cancelled:
                    self.counts["cancelled"] += 1
                else:
                    self.counts["failed"] += 1
                    job._put(_ERROR, exc)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    try:
                        close()  # leaving the generator stops decoding at once
                    except Exception:
                        pass
                self._current = None
                job._put(_DONE)
