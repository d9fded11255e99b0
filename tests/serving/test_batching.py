"""The batching worker on its own (no model): what is batched together, queue limits, cancellation, isolation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vargpt.serving.batching import BatchingWorker, Job, QueueFullError, check_cancelled


def _worker(calls: list, gate: threading.Event | None = None, **limits) -> BatchingWorker:
    def run(jobs):
        if gate is not None:
            gate.wait(5)
        calls.append([job.payload for job in jobs])
        if any(job.payload == "bad" for job in jobs):
            raise ValueError("bad payload")
        return [job.payload.upper() for job in jobs]

    return BatchingWorker({"echo": run, "other": run}, **limits)


def test_compatible_jobs_share_a_batch_up_to_the_row_limit():
    async def scenario():
        calls: list = []
        gate = threading.Event()
        worker = _worker(calls, gate, max_batch_size=3, queue_size=10)
        worker.start()
        blocker = worker.submit(Job("echo", "k0", "first"))
        await asyncio.sleep(0.05)  # the worker now holds "first" and waits at the gate
        futures = [
            worker.submit(Job("echo", "k1", "a")),
            worker.submit(Job("echo", "k2", "b")),  # other settings: its own batch
            worker.submit(Job("echo", "k1", "c", rows=2)),  # would make 3 rows with "a": fits
            worker.submit(Job("other", "k1", "d")),  # other kind
            worker.submit(Job("echo", "k1", "e")),  # 4th row: next batch
        ]
        gate.set()
        results = await asyncio.gather(blocker, *futures)
        worker.stop()
        return calls, results

    calls, results = asyncio.run(scenario())
    assert results == ["FIRST", "A", "B", "C", "D", "E"]
    assert calls == [["first"], ["a", "c"], ["b"], ["d"], ["e"]]


def test_full_queue_refuses_and_cancelled_jobs_are_skipped():
    async def scenario():
        calls: list = []
        gate = threading.Event()
        worker = _worker(calls, gate, max_batch_size=4, queue_size=2)
        worker.start()
        running = worker.submit(Job("echo", "k", "running"))
        await asyncio.sleep(0.05)
        dropped = Job("echo", "k", "dropped")
        worker.submit(dropped)
        kept = worker.submit(Job("echo", "k", "kept"))
        with pytest.raises(QueueFullError):
            worker.submit(Job("echo", "k", "one too many"))
        dropped.cancelled = True
        gate.set()
        out = await asyncio.gather(running, kept)
        worker.stop()
        return calls, out

    calls, out = asyncio.run(scenario())
    assert out == ["RUNNING", "KEPT"] and calls == [["running"], ["kept"]]


def test_a_failing_request_does_not_fail_its_batch_neighbours():
    async def scenario():
        calls: list = []
        gate = threading.Event()
        worker = _worker(calls, gate, max_batch_size=4, queue_size=4)
        worker.start()
        first = worker.submit(Job("echo", "k", "first"))
        await asyncio.sleep(0.05)
        good = worker.submit(Job("echo", "k", "good"))
        bad = worker.submit(Job("echo", "k", "bad"))
        gate.set()
        results = await asyncio.gather(first, good, bad, return_exceptions=True)
        worker.stop()
        return calls, results

    calls, results = asyncio.run(scenario())
    assert results[:2] == ["FIRST", "GOOD"] and isinstance(results[2], ValueError)
    assert calls == [["first"], ["good", "bad"], ["good"], ["bad"]]


def test_check_cancelled_stops_only_when_every_job_gave_up():
    jobs = [Job("echo", "k", "a"), Job("echo", "k", "b")]
    jobs[0].cancelled = True
    check_cancelled(jobs)
    jobs[1].cancelled = True
    with pytest.raises(RuntimeError, match="cancelled"):
        check_cancelled(jobs)


def test_cancelling_a_queued_job_frees_its_place_at_once():
    async def scenario():
        gate = threading.Event()
        worker = _worker([], gate, max_batch_size=1, queue_size=1)
        worker.start()
        running = worker.submit(Job("echo", "k", "running"))
        await asyncio.sleep(0.05)
        gone = Job("echo", "k", "gone")
        worker.submit(gone)
        worker.cancel(gone)
        queued_after_cancel = worker.queued
        kept = worker.submit(Job("echo", "k", "kept"))  # the cancelled job's place
        gate.set()
        out = await asyncio.gather(running, kept)
        worker.stop()
        return queued_after_cancel, out

    queued_after_cancel, out = asyncio.run(scenario())
    assert queued_after_cancel == 0 and out == ["RUNNING", "KEPT"]


def test_every_kind_keeps_its_reserved_places_when_another_floods_the_queue():
    async def scenario():
        gate = threading.Event()
        worker = _worker([], gate, max_batch_size=1, queue_size=8)  # two kinds: 2 places reserved for each
        worker.start()
        worker.submit(Job("echo", "k", "running"))
        await asyncio.sleep(0.05)
        admitted = {"echo": 0, "other": 0}
        for kind in ("echo", "other"):
            for _ in range(10):
                try:
                    worker.submit(Job(kind, "k", kind))
                except QueueFullError:
                    break
                admitted[kind] += 1
        worker.stop(timeout=0)
        gate.set()
        return admitted

    assert asyncio.run(scenario()) == {"echo": 6, "other": 2}


def test_reserve_must_fit_the_queue():
    with pytest.raises(ValueError, match="reserve"):
        BatchingWorker({"a": list, "b": list}, queue_size=4, reserve=3)
