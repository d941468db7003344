"""Inference workers that batch concurrent streams (torch-free).

Connections submit `(decoder, pcm | None)` jobs and await a future. Each of the
`num_workers` threads takes every pending job (up to `max_batch`), feeds the audio
and advances those streams together with `advance_many`, so the CTC heads of all
ready chunks run in one ONNX Runtime call; the encoders run stream by stream
because their caches have no batch axis. The asyncio loop never runs inference.

Fairness: `slices()` cuts a stream's audio into jobs of at most `slice_samples`
samples (a few encoder chunks), and a stream has at most one job queued at a
time: its next slice joins the back of the queue only after the previous one is
done. The queue has two classes, each FIFO: urgent jobs (the first slice of audio
from a stream that is not ahead of real time, as the caller judges) before the
rest (later slices: a backlog). Streams therefore take turns round robin within a
class, one slice each, and a real-time stream's chunk waits for at most the slices
already running, never for another client's minute of audio sent in one frame.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import AsyncIterator, List, Optional, Tuple

import numpy as np

from .decoder import Event, StreamingDecoder, advance_many

_STOP = object()


class InferenceWorkers:
    """A pool of inference threads fed by a queue.

    Args:
        num_workers: threads (about one per CPU core).
        max_batch: most streams advanced together (1: no batching).
        slice_samples: most samples of one stream fed and decoded per job by
            `slices()` (0: no limit).
    """

    def __init__(self, num_workers: int = 2, max_batch: int = 1, slice_samples: int = 0) -> None:
        self.max_batch = max(1, int(max_batch))
        self.slice_samples = max(0, int(slice_samples))
        self.jobs_run = 0
        self._jobs: "queue.PriorityQueue" = queue.PriorityQueue()   # (class, seq, job)
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._run, name=f"asr-worker-{i}", daemon=True)
                         for i in range(max(1, int(num_workers)))]
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
        self._jobs.put((0 if urgent else 1, next(self._seq), (decoder, pcm, finish, loop, future)))
        return await future

    def _run(self) -> None:
        while True:
            first = self._jobs.get()[2]
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()[2]
                except queue.Empty:
                    break
                if job is _STOP:
                    self._jobs.put((2, next(self._seq), _STOP))  # finish the batch, then stop
                    break
                batch.append(job)
            self._process(batch)

    def _process(self, batch: List[Tuple]) -> None:
        ok: List[Tuple] = []
        for job in batch:
            decoder, pcm, finish, loop, future = job
            try:
                if pcm is not None and pcm.size:
                    decoder.accept_waveform(pcm)
                if finish:
                    decoder.input_finished()
                ok.append(job)
            except Exception as exc:  # a bad stream must not take the others down
                loop.call_soon_threadsafe(_resolve, future, None, exc)
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
        for _ in self._threads:
            self._jobs.put((2, next(self._seq), _STOP))
        for t in self._threads:
            t.join(timeout=30)


def _resolve(future: asyncio.Future, result, exc) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
