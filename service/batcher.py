"""The request batcher: concurrent /generate requests share UNet calls, whatever their pack sets.

One thread owns the model work. Requests wait in a FIFO queue; at every step boundary the batcher admits queued
requests while the images in flight stay within ``max_batch_size`` (continuous batching: a request joins a running
batch without waiting for it to finish), encodes their prompts, draws their noise, and advances every request in
flight one denoising step (``erasure.denoise.BatchDenoiser``: one UNet call per image size, rows of different pack
sets through ``erasure.mixed.MixedDenoiser``). A finished request is decoded and its future resolved; a cancelled one
(client gone, timed out) leaves at the next step boundary. When idle, the first request waits up to
``max_latency_ms`` for company before the batch starts.

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
    future: cf.Future = dataclasses.field(default_factory=cf.Future)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False

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


class Batcher:
    """Queue, batch formation and the denoising thread (see the module docstring)."""

    def __init__(self, pipe, max_batch_size: int = 16, max_latency_ms: float = 5.0, continuous: bool = True,
                 on_step: Callable[[int], None] | None = None):
        # its own pipeline object and tokenizers (SDXL has two): only this thread encodes prompts with them
        self.pipe = share_pipeline(pipe, **{name: copy.deepcopy(module) for name, module in pipe.components.items()
                                            if name.startswith("tokenizer") and module is not None})
        self.batch = BatchDenoiser(self.pipe)
        self.max_batch_size, self.max_latency = max_batch_size, max_latency_ms / 1000
        self.continuous, self.on_step = continuous, on_step
        self.stats = BatcherStats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="erasure-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        if len(job.seeds) > self.max_batch_size:
            raise ValueError(f"{len(job.seeds)} images do not fit in a batch of {self.max_batch_size}")
        with self._cv:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            self._queue.append(job)
            self._cv.notify()
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; queued and running requests fail with BatcherClosed."""
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
            free = self.max_batch_size - sum(track.images for _, track in running)
            admitted = []
            while self._queue and (self._queue[0].cancelled or len(self._queue[0].seeds) <= free):
                job = self._queue.popleft()
                if job.cancelled:
                    self.stats.cancelled += 1
                    continue
                admitted.append(job)
                free -= len(job.seeds)
            return admitted

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
                if not running:
                    continue
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
        with self._cv:
            left = list(self._queue)
            self._queue.clear()
        self._fail(left + [j for j, _ in running], BatcherClosed("the service is shutting down"))
