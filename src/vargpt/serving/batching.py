"""A bounded request queue served by one model thread that batches compatible requests.

Torch modules are not re-entrant across threads, so exactly one thread touches the model. Handlers on the event
loop `submit` a `Job` and await its future; the worker takes the oldest live job plus every queued job with the
same `batch_key` (same kind, same settings) until the batch holds `max_batch_size` rows, runs them in one batched
call, and resolves each job's future on the event loop. A job whose caller gave up (time limit, disconnect) is
marked cancelled: it is skipped if still queued, its result is dropped if it is running, and a batch whose jobs
have all been cancelled is stopped at its next token (`check_cancelled`). If a batched call fails, each job is
retried alone so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(RuntimeError):
    """The queue already holds its maximum number of waiting jobs."""


class BatchCancelledError(RuntimeError):
    """Raised inside a running batch when every job in it has been cancelled (stops the model early)."""


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request: `payload` is what the runner needs; `rows` is how many batch rows it occupies."""

    kind: str
    batch_key: Hashable
    payload: Any
    rows: int = 1
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    on_event: Callable[[Any], None] | None = None  # called on the worker thread (streaming)
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))

    def emit(self, event: Any) -> None:
        """Send a streaming event to the job's event loop (thread-safe; dropped once cancelled)."""
        if self.on_event is not None and not self.cancelled and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed
                self.loop.call_soon_threadsafe(self.on_event, event)


Runner = Callable[[Sequence[Job]], Sequence[Any]]


class BatchingWorker:
    """`runners[kind](jobs)` returns one result per job, in order; it runs on the worker thread only."""

    def __init__(self, runners: dict[str, Runner], max_batch_size: int = 8, queue_size: int = 64) -> None:
        if max_batch_size < 1 or queue_size < 1:
            raise ValueError(f"max_batch_size and queue_size must be >= 1, got {max_batch_size}, {queue_size}")
        self.runners = runners
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.largest_batch = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vargpt-model-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # -- event-loop side -------------------------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job (raises `QueueFullError` when full) and return the future its result arrives on."""
        if job.kind not in self.runners:
            raise ValueError(f"unknown job kind {job.kind!r}")
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._queue) >= self.queue_size:
                raise QueueFullError(f"the queue is full ({self.queue_size} requests waiting)")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    # -- worker side -----------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            for job in list(self._queue):
                if job.cancelled:
                    self._queue.remove(job)
                elif job.kind == first.kind and job.batch_key == first.batch_key:
                    if rows + job.rows > self.max_batch_size:
                        break
                    self._queue.remove(job)
                    batch.append(job)
                    rows += job.rows
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        runner = self.runners[batch[0].kind]
        try:
            results = list(runner(batch))
        except BatchCancelledError:
            return
        except Exception as error:
            if len(batch) == 1:
                _resolve(batch[0], error=error)
                return
            for job in batch:  # isolate the failing request
                if not job.cancelled:
                    self._run([job])
            return
        for job, result in zip(batch, results, strict=True):
            _resolve(job, result=result)


def check_cancelled(jobs: Sequence[Job]) -> None:
    """Call from a runner between steps: stops the batch when nobody waits for it any more."""
    if all(job.cancelled for job in jobs):
        raise BatchCancelledError("every request of this batch was cancelled")


def _resolve(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    if job.cancelled or job.future is None or job.loop is None:
        return

    def settle() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed event loop (shutdown): nobody is waiting any more
        job.loop.call_soon_threadsafe(settle)
