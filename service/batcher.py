"""The request batcher: concurrent /generate requests share UNet calls, whatever their pack sets.

One thread owns the model work. Requests wait in a FIFO queue; at every step boundary the batcher admits queued
requests while the images in flight stay within ``max_batch_size`` (continuous batching: a request joins a running
batch without waiting for it to finish), encodes their prompts, draws their noise, and advances every request in
flight one denoising step (``erasure.sampling.denoise.BatchDenoiser``: one UNet call per image size, rows of
different pack sets through ``erasure.sampling.mixed.MixedDenoiser``). A finished request is decoded and its future
resolved; a cancelled one (client gone, timed out) leaves at the next step boundary. When idle, the first request
waits up to ``max_latency_ms`` for company before the batch starts.

Overload is shed, never queued without bound: ``submit`` refuses a request (``Overloaded``, with the seconds after
which a retry may be admitted) when the images already waiting reach ``max_queue``; a request with a ``deadline``
that passes before its images are ready leaves the queue or the batch (``DeadlineExceeded``), so every image that is
served was served within it.

Example:
    >>> batcher = Batcher(pipe, max_batch_size=16, max_latency_ms=5)
    >>> job = batcher.submit(Job("a red circle", None, seeds=[0], steps=20, guidance=3.0, height=64, width=64))
    >>> [image] = job.future.result()
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from erasure.base.families import conditioner_for
from erasure.sampling.denoise import BatchDenoiser, DenoiseRequest, Track
from erasure.sampling.generate import share_pipeline

logger = logging.getLogger("erasure.service")


class BatcherClosed(RuntimeError):
    """The service is shutting down; the request was not run."""


class Overloaded(RuntimeError):
    """The queue is full: the request was not admitted. ``retry_after``: seconds until the queue has drained."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before its images were ready; it left the queue or the batch."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request for the batcher: its settings and pack set's denoiser in, its images out (``future``)."""

    prompt: str
    negative_prompt: str | None
    seeds: list[int]
    steps: int
    guidance: float
    height: int
    width: int
    denoiser: nn.Module | None = None  # the pack set's denoiser (None: the base's)
    deadline: float | None = None  # time.perf_counter() by which the images must be ready (None: no deadline)
    future: cf.Future = dataclasses.field(default_factory=cf.Future)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False

    def late(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (the client is gone); no result will be set."""
        self.cancelled = True


@dataclasses.dataclass
class BatcherStats:
    """Counters since start-up (read by tests and /metrics)."""

    steps: int = 0           # UNet steps run (one per image size per iteration)
    images_stepped: int = 0  # images summed over those steps (mean batch = images_stepped / steps)
    max_images: int = 0      # most images in one step
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    shed: int = 0            # refused at admission: the queue was full
    expired: int = 0         # left the queue or the batch at their deadline


class Batcher:
    """Queue, batch formation and the denoising thread (see the module docstring)."""

    def __init__(self, pipe, max_batch_size: int = 16, max_latency_ms: float = 5.0, continuous: bool = True,
                 on_step: Callable[[int], None] | None = None, max_queue: int | None = None,
                 on_queue: Callable[[int], None] | None = None):
        # its own pipeline object and tokenizers (SDXL has two): only this thread encodes prompts with them
        self.pipe = share_pipeline(pipe, **{name: copy.deepcopy(module) for name, module in pipe.components.items()
                                            if name.startswith("tokenizer") and module is not None})
        self.batch = BatchDenoiser(self.pipe)
        self.max_batch_size, self.max_latency = max_batch_size, max_latency_ms / 1000
        self.continuous, self.on_step, self.on_queue = continuous, on_step, on_queue
        self.max_queue = 4 * max_batch_size if max_queue is None else max_queue
        self.stats = BatcherStats()
        self._rate = 0.0  # images finished per second, smoothed: how fast the queue drains
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = self._draining = False
        self._running = 0  # requests in the batch now
        self._thread = threading.Thread(target=self._run, name="erasure-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``; Overloaded when the images waiting would pass ``max_queue``, BatcherClosed when closing."""
        if len(job.seeds) > self.max_batch_size:
            raise ValueError(f"{len(job.seeds)} images do not fit in a batch of {self.max_batch_size}")
        with self._cv:
            if self._closed or self._draining:
                raise BatcherClosed("the service is shutting down")
            waiting = self.queued_images()
            if waiting + len(job.seeds) > self.max_queue:
                self.stats.shed += 1
                raise Overloaded(f"the service is at capacity ({waiting} images waiting, at most {self.max_queue}); "
                                 "retry after the time in Retry-After", self.retry_after(waiting))
            self._queue.append(job)
            self._queued_changed()
            self._cv.notify()
        return job

    def _queued_changed(self) -> None:
        if self.on_queue is not None:
            self.on_queue(self.queued_images())

    def queued_images(self) -> int:
        """Images waiting for a batch (not yet started)."""
        return sum(len(j.seeds) for j in self._queue if not j.cancelled)

    def retry_after(self, waiting: int | None = None) -> float:
        """Seconds until ``waiting`` images (default: those queued now) have drained, at the recent rate."""
        waiting = self.queued_images() if waiting is None else waiting
        return max(1.0, waiting / self._rate) if self._rate > 0 else 1.0

    def close(self, drain: float = 0.0, timeout: float = 10.0) -> None:
        """Stop admitting; let the requests in flight finish for up to ``drain`` seconds, then stop after the
        current step: whatever is queued or still running fails with BatcherClosed (never a half result)."""
        with self._cv:
            self._draining = True
            for job in self._queue:
                if not job.future.done():
                    job.future.set_exception(BatcherClosed("the service is shutting down"))
            self._queue.clear()
            self._cv.notify()
        end = time.perf_counter() + drain
        while drain and self._running and time.perf_counter() < end:
            time.sleep(0.05)
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # --- the batcher thread -------------------------------------------------------------------------------------

    def _admit(self, running: list[tuple[Job, Track]]) -> list[Job]:
        """Jobs to start now (FIFO, no overtaking); waits for work, and when idle up to max_latency for company."""
        with self._cv:
            while not self._queue and not running and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
            if not running and self._queue:
                deadline = self._queue[0].submitted + self.max_latency
                while (sum(len(j.seeds) for j in self._queue) < self.max_batch_size and not self._closed
                       and (wait := deadline - time.perf_counter()) > 0):
                    self._cv.wait(wait)
            if running and not self.continuous:
                return []
            now = time.perf_counter()
            for job in [j for j in self._queue if j.late(now)]:  # its deadline passed while it waited
                self._queue.remove(job)
                self._expire(job)
            free = self.max_batch_size - sum(track.images for _, track in running)
            admitted = []
            while self._queue and (self._queue[0].cancelled or len(self._queue[0].seeds) <= free):
                job = self._queue.popleft()
                if job.cancelled:
                    self.stats.cancelled += 1
                    continue
                admitted.append(job)
                free -= len(job.seeds)
            self._queued_changed()
            return admitted

    def _expire(self, job: Job) -> None:
        self.stats.expired += 1
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded("the request's deadline passed before its images were ready"))

    def _start(self, jobs: list[Job]) -> list[tuple[Job, Track]]:
        if not jobs:
            return []
        pipe = self.pipe
        conditioner = conditioner_for(pipe, self.batch.device, pipe.text_encoder.dtype)  # caches this round only
        started = []
        for job in jobs:
            try:
                cond = conditioner.encode([job.prompt])
                uncond = conditioner.encode([job.negative_prompt]) if job.negative_prompt else \
                    conditioner.unconditional(1)
                request = DenoiseRequest(cond, uncond, job.seeds, job.steps, job.guidance, job.height, job.width,
                                         job.denoiser)
                started.append((job, self.batch.start(request)))
            except Exception as exc:  # this request only
                logger.exception("request could not start")
                self._fail([job], exc)
        return started

    def _measure(self, images: int, seconds: float, tracks: list[Track]) -> None:
        """Smooth the drain rate: images in flight over the time their remaining steps take at this step's pace."""
        if images and seconds > 0:
            steps = max(1.0, sum(len(t.timesteps) * t.images for t in tracks) / images)  # a request's steps, mean
            rate = images / (seconds * steps)
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        for job in jobs:
            self.stats.failed += 1
            if not job.future.done():
                job.future.set_exception(exc)

    def _run(self) -> None:
        running: list[tuple[Job, Track]] = []
        with torch.inference_mode():
            while True:
                admitted = self._admit(running)
                if self._closed:
                    break
                running += self._start(admitted)
                gone = [(j, t) for j, t in running if j.cancelled]
                if gone:
                    self.stats.cancelled += len(gone)
                    running = [(j, t) for j, t in running if not j.cancelled]
                now = time.perf_counter()
                for job, _ in [(j, t) for j, t in running if j.late(now)]:  # leaves now rather than finish late
                    self._expire(job)
                running = [(j, t) for j, t in running if not j.late(now)]
                self._running = len(running)
                if not running:
                    continue
                started = time.perf_counter()
                tracks = [t for _, t in running]
                try:
                    self.batch.step(tracks)
                except Exception as exc:
                    logger.exception("batched step failed for %d request(s)", len(running))
                    self._fail([j for j, _ in running], exc)
                    running = []
                    continue
                sizes: dict[tuple[int, int], int] = {}
                for t in tracks:
                    key = (t.request.height, t.request.width)
                    sizes[key] = sizes.get(key, 0) + t.images
                for images in sizes.values():
                    self.stats.steps += 1
                    self.stats.images_stepped += images
                    self.stats.max_images = max(self.stats.max_images, images)
                    if self.on_step is not None:
                        self.on_step(images)
                finished = [(j, t) for j, t in running if t.done]
                if finished:
                    running = [(j, t) for j, t in running if not t.done]
                    try:
                        outputs = self.batch.decode([t for _, t in finished])
                    except Exception as exc:
                        logger.exception("decoding failed for %d request(s)", len(finished))
                        self._fail([j for j, _ in finished], exc)
                        continue
                    for (job, _), images in zip(finished, outputs):
                        self.stats.completed += 1
                        if not job.future.done():
                            job.future.set_result(images)
                self._running = len(running)
                self._measure(sum(t.images for t in tracks), time.perf_counter() - started, tracks)
        with self._cv:
            left = list(self._queue)
            self._queue.clear()
        self._fail(left + [j for j, _ in running], BatcherClosed("the service is shutting down"))
