"""Inference workers that batch concurrent streams (torch-free).

Connections submit `(decoder, pcm | None)` jobs and await a future. Each of the
`num_workers` threads takes every pending job (up to `max_batch`), feeds the audio
and advances those streams together with `advance_many`: per round, the ready
chunks of all of them run in one encoder call when the model has the batched
encoder (`encoder_batch.onnx`, fp32; else stream by stream) and their CTC heads in
one call. The asyncio loop never runs inference.

Holding (`batch_wait_s` > 0, `max_batch` > 1): real-time streams' jobs arrive one
at a time, so an idle worker would take each alone. A job whose audio may complete
an encoder chunk (`StreamingDecoder.may_complete_chunk`) then stays queued until the
oldest such job has waited `batch_wait_s`, so that the chunks of the streams whose
audio arrives meanwhile share its encoder call; unless `max_batch` of them are
queued, or no other open stream could bring one (a lone stream is never held). Jobs
that only add audio and jobs that end their stream are never held, and neither are
workers: whichever is free takes what is due, the others keep working.

Fairness: `slices()` cuts a stream's audio into jobs of at most `slice_samples`
samples (a few encoder chunks), and a stream has at most one job queued at a
time: its next slice joins the back of the queue only after the previous one is
done. There are two FIFO queues: urgent jobs (the first slice of audio from a
stream that is not ahead of real time, as the caller judges) go before the rest
(later slices: a backlog), and backlog jobs occupy at most `num_workers - 1`
workers at a time (one with a single worker), so with two or more workers one is
always free for real-time streams. Streams take turns round robin within a queue,
one slice each, and a real-time stream's chunk never waits for another client's
minute of audio sent in one frame.
"""
from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from typing import AsyncIterator, Deque, List, Optional, Tuple

import numpy as np

from .decoder import Event, StreamingDecoder, advance_many

class InferenceWorkers:
    """A pool of inference threads fed by a queue.

    Args:
        num_workers: threads (about one per CPU core).
        max_batch: most streams advanced together (1: no batching).
        slice_samples: most samples of one stream fed and decoded per job by
            `slices()` (0: no limit).
        batch_wait_s: longest an urgent job is held for other streams' jobs to batch
            with (module docstring; 0: never).
    """

    def __init__(self, num_workers: int = 2, max_batch: int = 1, slice_samples: int = 0,
                 batch_wait_s: float = 0.0) -> None:
        self.max_batch = max(1, int(max_batch))
        self.slice_samples = max(0, int(slice_samples))
        self.batch_wait_s = max(0.0, float(batch_wait_s))
        self.held_batches = 0   # batches whose oldest job had waited batch_wait_s or more
        self._streams: "weakref.WeakSet[StreamingDecoder]" = weakref.WeakSet()  # ever submitted
        self.jobs_run = 0
        num_workers = max(1, int(num_workers))
        self._cv = threading.Condition()
        self._urgent: Deque[Tuple] = deque()
        self._backlog: Deque[Tuple] = deque()
        self._backlog_slots = max(1, num_workers - 1)
        self._backlog_running = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"asr-worker-{i}", daemon=True)
                         for i in range(num_workers)]
        self.batches_run = 0
        self.streams_run = 0
        for t in self._threads:
            t.start()

    async def submit(self, decoder: StreamingDecoder, pcm: Optional[np.ndarray],
                     finish: bool = False, urgent: bool = True) -> List[Event]:
        """Feed `pcm` (int16, may be None), optionally end the input, and decode.

        Returns the stream's events. The caller must not submit the same decoder
        again before this returns.
        """
        events: List[Event] = []
        async for part in self.slices(decoder, pcm, finish, urgent):
            events.extend(part)
        return events

    async def slices(self, decoder: StreamingDecoder, pcm: Optional[np.ndarray],
                     finish: bool = False, urgent: bool = True) -> AsyncIterator[List[Event]]:
        """Like `submit`, in jobs of at most `slice_samples` samples; yields each
        job's events as soon as it is done (the input ends with the last slice).

        Each slice is queued only after the previous one finished, behind the jobs
        of the other streams (round robin); the first one in the urgent class if
        `urgent`, the later ones never.
        """
        n = 0 if pcm is None else int(pcm.shape[0])
        step = self.slice_samples if 0 < self.slice_samples < n else max(n, 1)
        for start in range(0, max(n, 1), step):
            part = None if pcm is None else pcm[start: start + step]
            last = start + step >= n
            yield await self._job(decoder, part, finish and last, urgent and start == 0)

    async def _job(self, decoder: StreamingDecoder, pcm: Optional[np.ndarray],
                   finish: bool, urgent: bool) -> List[Event]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            self._streams.add(decoder)
            (self._urgent if urgent else self._backlog).append(
                (decoder, pcm, finish, loop, future, time.monotonic()))
            self._cv.notify_all()
        return await future

    def _urgent_due(self) -> Tuple[List[Tuple], float]:
        """(the urgent jobs due now, up to `max_batch`, in queue order; seconds until the
        held ones fall due, 0 when none is held). Called with the lock held."""
        jobs = list(self._urgent)
        if self.batch_wait_s <= 0 or self.max_batch <= 1 or self._stopping:
            return jobs[:self.max_batch], 0.0
        heavy = [job for job in jobs
                 if not job[2] and job[0].may_complete_chunk(0 if job[1] is None else job[1].shape[0])]
        wait = 0.0
        if heavy and len(heavy) < self.max_batch:
            queued = {id(job[0]) for job in heavy}
            if any(not d.stopped and id(d) not in queued for d in list(self._streams)):
                wait = heavy[0][5] + self.batch_wait_s - time.monotonic()
        if wait <= 0:
            return jobs[:self.max_batch], 0.0
        held = {id(job) for job in heavy}
        return [job for job in jobs if id(job) not in held][:self.max_batch], wait

    def _take(self) -> Optional[Tuple[List[Tuple], bool]]:
        """The next batch and whether it is backlog; None when stopping and idle."""
        with self._cv:
            while True:
                due, wait = self._urgent_due() if self._urgent else ([], 0.0)
                if due:
                    taken = {id(job) for job in due}
                    kept = [job for job in self._urgent if id(job) not in taken]
                    self._urgent.clear()
                    self._urgent.extend(kept)
                    if self.batch_wait_s > 0 and time.monotonic() - due[0][5] >= self.batch_wait_s:
                        self.held_batches += 1
                    return due, False
                if self._backlog and self._backlog_running < self._backlog_slots:
                    self._backlog_running += 1
                    batch = [self._backlog.popleft()]
                    while self._backlog and len(batch) < self.max_batch:
                        batch.append(self._backlog.popleft())
                    return batch, True
                if self._stopping and not self._urgent and not self._backlog:
                    return None
                self._cv.wait(wait if wait > 0 else None)

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            batch, backlog = taken
            try:
                self._process(batch)
            finally:
                if backlog:
                    with self._cv:
                        self._backlog_running -= 1
                        self._cv.notify_all()

    @staticmethod
    def _feed(batch: List[Tuple], ok: List[Tuple]) -> None:
        """Give each job's audio to its decoder; the jobs that took it join `ok`."""
        for job in batch:
            decoder, pcm, finish, loop, future = job[:5]
            try:
                if pcm is not None and pcm.size:
                    decoder.accept_waveform(pcm)
                if finish:
                    decoder.input_finished()
                ok.append(job)
            except Exception as exc:  # a bad stream must not take the others down
                loop.call_soon_threadsafe(_resolve, future, None, exc)

    def _process(self, batch: List[Tuple]) -> None:
        ok: List[Tuple] = []
        self._feed(batch, ok)
        if not ok:
            return
        try:
            results = advance_many([job[0] for job in ok])
        except Exception:
            results = None
        if results is None:  # retry one by one so only the failing stream fails
            for job in ok:
                try:
                    res = job[0].advance()
                    job[3].call_soon_threadsafe(_resolve, job[4], res, None)
                except Exception as exc:
                    job[3].call_soon_threadsafe(_resolve, job[4], None, exc)
            return
        self.batches_run += 1
        self.streams_run += len(ok)
        self.jobs_run += len(ok)
        for job, res in zip(ok, results):
            job[3].call_soon_threadsafe(_resolve, job[4], res, None)

    def shutdown(self) -> None:
        """Stop the threads after the queued jobs."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)


def _resolve(future: asyncio.Future, result, exc) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
