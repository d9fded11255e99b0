"""A bounded request queue served by one model thread that batches compatible requests.

Torch modules are not re-entrant across threads, so exactly one thread touches the model. Handlers on the event
loop `submit` a `Job` and await its future; the worker takes the oldest live job plus every queued job with the
same `batch_key` (same kind, same settings) until the batch holds `max_batch_size` rows, runs them in one batched
call, and resolves each job's future on the event loop. A job whose caller gave up (time limit, disconnect) is
`cancel`led: it leaves the queue at once if still queued, its result is dropped if it is running, and a batch
whose jobs have all been cancelled is stopped at its next step (runners raise `BatchCancelledError`, for
instance through `check_cancelled`). If a batched call fails, each job is retried alone so one bad request
cannot fail its neighbours.

Admission is fair across job kinds: each kind has `reserve` queue places that the other kinds cannot take, so a
request that is slow to arrive (a multipart upload) still finds a place while fast ones flood the queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
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

    def __init__(
        self, runners: dict[str, Runner], max_batch_size: int = 8, queue_size: int = 64, reserve: int | None = None
    ) -> None:
        if max_batch_size < 1 or queue_size < 1:
            raise ValueError(f"max_batch_size and queue_size must be >= 1, got {max_batch_size}, {queue_size}")
        # by default half the queue is kept in reserve, shared equally by the kinds
        reserve = queue_size // (2 * len(runners)) if reserve is None else reserve
        if reserve < 0 or reserve * len(runners) > queue_size:
            raise ValueError(f"reserve must be in 0..{queue_size // len(runners)}, got {reserve}")
        self.runners = runners
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.reserve = reserve
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.batches_stopped = 0  # stopped early: every request in them had been cancelled
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
            if not self._admits(job.kind):
                raise QueueFullError(f"the queue is full ({len(self._queue)} requests waiting)")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """Nobody waits for `job` any more: drop it from the queue, or let its running batch stop early."""
        job.cancelled = True
        with self._cond, contextlib.suppress(ValueError):  # ValueError: already taken by the worker
            self._queue.remove(job)

    def _admits(self, kind: str) -> bool:
        """Whether a job of `kind` gets a place; the caller holds the lock.

        Invariant: the free places are never fewer than the unused reserves of all kinds, so a kind under its
        reserve always finds a place, and the others share what is left."""
        free = self.queue_size - len(self._queue)
        if free <= 0:
            return False
        waiting = collections.Counter(job.kind for job in self._queue)
        if waiting[kind] < self.reserve:
            return True
        unused = sum(max(0, self.reserve - waiting[other]) for other in self.runners if other != kind)
        return free > unused

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
            self.batches_stopped += 1
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
