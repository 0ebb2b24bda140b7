"""Dynamic batching: the examples of concurrent requests gathered into few ONNX Runtime runs.

Standalone (the standard library only): the runtime images copy it beside server.py.

A request hands its tokenized rows to `Batcher.submit` and awaits their outputs. One task takes what is
waiting (after `wait_ms` when the model was idle: 0 takes only what already waits, so a lone client never
waits for company), sorts the rows by length (so a batch pads little), cuts them into batches of at most
`max_rows` rows and `max_tokens` padded tokens (a request of 64 long texts runs as several bounded batches:
memory stays bounded), and runs the batches one after another on the event loop's own thread, giving the loop
a turn between two runs. Rows come back to their request in its order. A queue longer than `max_queue` rows
is refused (the server answers 429).

With `across_requests` False, a run holds rows of one request only (several runs for a long one): for a
model whose answers depend on what shares its run (dynamic int8 computes one activation range per tensor
over the whole batch), a client's answer then never depends on another client's texts.

Why not a thread of its own: handing each run to an inference thread and back cost 0.8 ms a request on a
2-core VM (the two wake-ups; a single client: 3.1 ms against 2.3 ms inline, tests' tiny model), 10% of an
int8 MiniLM answer. ONNX Runtime runs on its own intra-op threads either way; while a run goes, new requests
wait in the socket buffers and join the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class Saturated(Exception):
    """The queue is full: the request is refused (429 with Retry-After), not queued."""


@dataclass(frozen=True)
class BatchSettings:
    max_rows: int = 32  # rows (examples) in one ONNX Runtime run
    max_tokens: int = 8192  # rows x padded length in one run
    wait_ms: float = 0.0  # how long an idle batcher waits for company before it runs what it has
    max_queue: int = 1024  # rows waiting beyond which a request is refused
    across_requests: bool = True  # False: a run holds the rows of one request only


@dataclass
class _Job:
    rows: Sequence[Any]
    lengths: list[int]
    future: asyncio.Future[list[Any]]
    outputs: list[Any] = field(default_factory=list)
    left: int = 0


@dataclass
class BatchStats:
    """What the metrics read: rows waiting now, and per run its rows and padded tokens."""

    queued_rows: int = 0
    observe: Callable[[int, int], None] | None = None  # (rows, padded tokens) of each run


def plan(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Batches of row indices: sorted by length (short first), each within max_rows and max_tokens padded
    tokens (a row longer than max_tokens runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[i]  # sorted: the newest row is the longest of its batch
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Batcher:
    """Runs `run_batch(rows) -> outputs (one per row)` for the rows of every waiting request."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], settings: BatchSettings) -> None:
        self.run_batch = run_batch
        self.settings = settings
        self.stats = BatchStats()
        self.waiting: list[_Job] = []
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what waits, then stop."""
        while self.waiting:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, rows: Sequence[Any], lengths: list[int]) -> list[Any]:
        """The outputs of these rows, in order, once a run has computed them."""
        if self.stats.queued_rows + len(rows) > self.settings.max_queue:
            raise Saturated(f"{self.stats.queued_rows} examples wait already; the limit is {self.settings.max_queue}")
        assert self.wake is not None, "Batcher.start() was not called"
        job = _Job(rows, lengths, asyncio.get_running_loop().create_future(), [None] * len(rows), len(rows))
        self.waiting.append(job)
        self.stats.queued_rows += len(rows)
        self.wake.set()
        return await job.future

    async def _loop(self) -> None:
        assert self.wake is not None
        while True:
            await self.wake.wait()
            if self.settings.wait_ms > 0:
                await asyncio.sleep(self.settings.wait_ms / 1000.0)
            self.wake.clear()
            jobs, self.waiting = self.waiting, []
            if jobs:
                await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        if not self.settings.across_requests:
            for job in jobs:
                await self._run_rows([(job, i) for i in range(len(job.rows))])
            return
        await self._run_rows([(job, i) for job in jobs for i in range(len(job.rows))])

    async def _run_rows(self, flat: list[tuple[_Job, int]]) -> None:
        lengths = [job.lengths[i] for job, i in flat]
        for batch in plan(lengths, self.settings.max_rows, self.settings.max_tokens):
            members = [flat[k] for k in batch]
            rows = [job.rows[i] for job, i in members]
            try:
                outputs = self.run_batch(rows)
            except Exception as exc:  # the run failed: every request with a row in it fails (500)
                for job, _ in members:
                    if not job.future.done():
                        job.future.set_exception(exc)
                outputs = [None] * len(rows)
            if self.stats.observe is not None:
                self.stats.observe(len(rows), len(rows) * max(lengths[k] for k in batch))
            for (job, i), out in zip(members, outputs, strict=True):
                job.outputs[i] = out
                job.left -= 1
                self.stats.queued_rows -= 1
                if job.left == 0 and not job.future.done():
                    job.future.set_result(job.outputs)
            await asyncio.sleep(0)  # the loop's turn: health checks, new requests, timeouts
