"""One model, one worker thread: requests run one at a time, in the order they arrived.

The event loop never runs the model. A request becomes a Job: a function that returns an iterator
(model.stream_chat, model.stream...), queued FIFO for the worker thread, which iterates it (the C core
and the tokenizer release the GIL) and hands each item to the event loop through an asyncio.Queue with
loop.call_soon_threadsafe. Job.cancel() (a client went away) takes a queued job out of the queue at once;
a running one is stopped between items and between chunks of the prompt, and its iterator is closed, so
the engine moves on to the next request at once.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import itertools
import os
import threading
import traceback
from typing import Any, Callable, Iterator

_ITEM, _ERROR, _DONE = 0, 1, 2

# A job that leaves the process this much bigger hands the allocator's free memory back to the OS (below).
TRIM_AFTER_GROWTH = 64 << 20


class JobCancelled(Exception):
    """Raised inside the worker (from the progress callback) to stop a cancelled job's prompt."""


class Job:
    """A queued request. Iterate it on the event loop (`async for item in job`); the worker's exceptions
    are raised there. cancel() may be called from any thread, at any time."""

    _ids = itertools.count(1)

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[["Job"], Iterator[Any]], engine=None):
        self.id = next(self._ids)
        self.work = work
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._finished = False

    # ---- any thread
    def cancel(self) -> None:
        self._cancelled.set()
        if self._engine is not None:
            self._engine._drop(self)

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
            try:
                raise value
            finally:
                # else exception -> traceback -> this frame -> exception: a cycle that keeps the worker's
                # frames in the traceback (a rejected prompt's text and ids) alive until the next gc pass
                value = None
        raise StopAsyncIteration

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.next()


def _rss() -> int:
    """This process's resident bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _find_malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc's; absent from other C libraries
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def release_memory() -> None:
    """Give the C allocator's free memory back to the OS. glibc keeps what a big job freed (tokenizing
    15 MB of text goes through ~1.8 GB in many small blocks, from several threads' arenas) for reuse,
    so the server would hold gigabytes after one large prompt; malloc_trim returns them (25 ms for 450 MB)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Engine:
    """Runs jobs on one model, one at a time, in submission order, on a worker thread."""

    def __init__(self, model, name: str = "flashmoe-engine"):
        self.model = model
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
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
        return len(self._queue)

    def submit(
        self, work: Callable[[Job], Iterator[Any]], loop: asyncio.AbstractEventLoop | None = None
    ) -> Job:
        """Queue work(job) -> iterator; returns the Job to iterate on the event loop."""
        job = Job(loop or asyncio.get_running_loop(), work, self)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._queue.append(job)
            self._cv.notify()
        return job

    def _drop(self, job: Job) -> None:
        """A cancelled job still in the queue leaves it now: it never runs, and its request (and the
        memory it holds) is answered at once rather than when its turn would have come."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:  # running (the worker sees the flag), done, or never queued
                return
            self.counts["cancelled"] += 1
        job.work = None
        job._put(_DONE)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the running and queued jobs and stop the worker."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            cur = self._current
            self._cv.notify()
        if cur is not None:
            cur.cancel()
        for job in pending:
            job.cancel()
            job._put(_DONE)
        self._thread.join(timeout)

    # ---- worker
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self._current = job
            self._run_job(job)
            del job  # the request's data goes with it, not when the next request comes

    def _run_job(self, job: Job) -> None:
        before = _rss()
        it, outcome, failure = None, "completed", None
        try:
            if job.cancelled:  # cancelled between leaving the queue and starting
                outcome = "cancelled"
                return
            it = job.work(job)
            for item in it:
                if job.cancelled:
                    break
                job._put(_ITEM, item)
            if job.cancelled:
                outcome = "cancelled"
        except JobCancelled:
            outcome = "cancelled"
        except Exception as exc:  # handed to the request, which answers with an error
            if job.cancelled:
                outcome = "cancelled"
            else:
                outcome, failure = "failed", exc
                # the request needs the exception, not the locals of the frames it went through (a
                # prompt's text, ids, encoding: hundreds of MB for a long one, to be freed now)
                traceback.clear_frames(exc.__traceback__)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()  # leaving the generator stops decoding at once
                except Exception:
                    pass
            job.work = it = None  # the request's data (its prompt) goes now
            if before and _rss() - before >= TRIM_AFTER_GROWTH:
                release_memory()
            with self._cv:
                self.counts[outcome] += 1
                self._current = None
            # only now is the request answered: the engine is idle and its memory back when it is
            if failure is not None:
                job._put(_ERROR, failure)
                failure = None  # else exception -> traceback -> this frame -> exception, a cycle
            else:
                job._put(_DONE)
