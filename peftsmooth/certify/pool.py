"""Images in flight: every forward pass filled from the pending sample requests of many images.

The certification of one image is a *job*: a generator that yields `Request`s (m samples of f(x + e)
from one of the image's noise streams) and is sent back each request's class counts; it returns the
image's answer. CERTIFY yields its n0 selection samples, then its n estimation samples; sequential
CERTIFY yields the selection samples, then one request per look (the increments 128, 33, 42, ...).

`run_pool` keeps images in flight and fills every forward pass of `batch_size` rows from their pending
requests, oldest image first, admitting the next image (its selection samples) whenever the pending
requests do not fill the batch; an image leaves when its job returns. A batch is partial only when
every image has joined and those left wait on their own counts (the end of a run, or a run of fewer
images than fill a batch). Each noise stream is read in order and only by its own image, so packing changes which forward
pass carries a sample, never which samples an image sees: an image's counts, decision, radius and
samples are those of certifying it alone, whatever the batch size, the pool size or the order of
images (validity rule 7; tests/certify/test_pool.py). Jobs finish in completion order.

The host reads counts only when a request completes (one synchronization per forward pass at most,
none while a long request is being drawn). Memory per image in flight: its image, the class counts
and at most NOISE_BLOCK - 1 buffered noise samples per stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterable, Iterator

import numpy as np
import torch

from peftsmooth.certify.noise import NoiseStream
from peftsmooth.runtime import evaluating

Job = Generator["Request", np.ndarray, Any]  # yields requests, is sent their counts, returns the answer


@dataclass
class Request:
    """m samples of f(x + e), e the next m samples of `stream`."""

    x: torch.Tensor
    stream: NoiseStream
    m: int


@dataclass
class Finished:
    """A job's answer, with its key and its share of the wall time (forward passes split by samples)."""

    key: Any
    result: Any
    seconds: float


@dataclass(eq=False)
class _InFlight:
    key: Any
    job: Job
    slot: int
    request: Request | None = None
    left: int = 0
    seconds: float = 0.0


@dataclass
class _Slots:
    """One row of class counts on the device per image in flight, reused when an image leaves."""

    num_classes: int
    device: torch.device
    counts: torch.Tensor | None = None
    free: list[int] = field(default_factory=list)
    used: int = 0

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        if self.counts is None or self.used == len(self.counts):
            grown = torch.zeros((max(8, 2 * self.used), self.num_classes), dtype=torch.long, device=self.device)
            if self.counts is not None:
                grown[: self.used] = self.counts
            self.counts = grown
        self.used += 1
        return self.used - 1

    def read_and_clear(self, slots: list[int]) -> np.ndarray:
        index = torch.tensor(slots, device=self.device)
        counts = self.counts.index_select(0, index).cpu().numpy()  # the host synchronization
        self.counts.index_fill_(0, index, 0)
        return counts


def run_pool(g, jobs: Iterable[tuple[Any, Job]], batch_size: int, *, max_in_flight: int | None = None
             ) -> Iterator[Finished]:
    """Run (key, job) pairs on the `Smooth` classifier g, many images in flight; yields each job's
    answer as it finishes. `max_in_flight` caps the images in flight (None: as many as fill a batch).
    Runs under g's precision, with f in eval mode."""
    source = iter(jobs)
    active: list[_InFlight] = []
    slots = _Slots(g.num_classes, g._device(None))
    with torch.no_grad(), evaluating(g.base_classifier):
        while True:
            pieces = _fill(active, source, slots, batch_size, max_in_flight)
            if not pieces:
                return
            start = time.perf_counter()
            _count(g, pieces, slots, batch_size)
            _share_time(pieces, time.perf_counter() - start)
            done = [image for image, _ in pieces if image.left == 0]
            if done:
                yield from _advance(done, active, slots)


def _fill(active: list[_InFlight], source: Iterator, slots: _Slots, batch_size: int,
          max_in_flight: int | None) -> list[tuple[_InFlight, torch.Tensor]]:
    """One batch: (image, its noisy samples) pieces, oldest image first, new images admitted as needed."""
    pieces, space, i = [], batch_size, 0
    while space > 0:
        if i == len(active) and not _admit(active, source, slots, max_in_flight):
            break
        image = active[i]
        i += 1
        take = min(image.left, space)
        if take == 0:
            continue
        request = image.request
        pieces.append((image, request.x.unsqueeze(0) + request.stream.take(take)))
        image.left -= take
        space -= take
    return pieces


def _admit(active: list[_InFlight], source: Iterator, slots: _Slots, max_in_flight: int | None) -> bool:
    """Start the next job (its first request), unless the pool is full or no job is left."""
    if max_in_flight is not None and len(active) >= max_in_flight:
        return False
    pair = next(source, None)
    if pair is None:
        return False
    key, job = pair
    start = time.perf_counter()
    image = _InFlight(key, job, slots.take())
    _set_request(image, next(job))
    image.seconds += time.perf_counter() - start
    active.append(image)
    return True


def _set_request(image: _InFlight, request: Request) -> None:
    if not (isinstance(request.m, (int, np.integer)) and not isinstance(request.m, bool) and request.m >= 1):
        raise ValueError(f"a job asked for {request.m!r} samples (an integer >= 1)")
    image.request, image.left = request, int(request.m)


def _count(g, pieces: list[tuple[_InFlight, torch.Tensor]], slots: _Slots, batch_size: int) -> None:
    """One forward pass over the pieces; each piece's votes added to its image's counts on the device."""
    batch = pieces[0][1] if len(pieces) == 1 else torch.cat([p for _, p in pieces])
    labels = g._classify(batch, batch_size)
    if len(pieces) == 1:
        rows = pieces[0][0].slot
    else:
        rows = torch.cat([torch.full((len(p),), image.slot, device=labels.device) for image, p in pieces])
    # scatter_add_, not bincount: CUDA's bincount reads the largest label on the host (a sync per batch)
    index = labels + rows * g.num_classes
    slots.counts.view(-1).scatter_add_(0, index, torch.ones_like(index))


def _share_time(pieces: list[tuple[_InFlight, torch.Tensor]], seconds: float) -> None:
    total = sum(len(p) for _, p in pieces)
    for image, p in pieces:
        image.seconds += seconds * len(p) / total


def _advance(done: list[_InFlight], active: list[_InFlight], slots: _Slots) -> Iterator[Finished]:
    """Send the finished requests their counts; a job that returns leaves the pool."""
    counts = slots.read_and_clear([image.slot for image in done])
    for image, image_counts in zip(done, counts):
        start = time.perf_counter()
        try:
            _set_request(image, image.job.send(image_counts))
            image.seconds += time.perf_counter() - start
        except StopIteration as stop:
            image.seconds += time.perf_counter() - start
            active.remove(image)
            slots.free.append(image.slot)
            yield Finished(image.key, stop.value, image.seconds)


def run_alone(g, job: Job, batch_size: int) -> Any:
    """One job with no other image in flight: its answer (the same as in any pool)."""
    return next(run_pool(g, [(None, job)], batch_size)).result


def in_order(finished: Iterable[Finished], keys: Iterable[Any]) -> Iterator[Finished]:
    """The finished jobs in the order of `keys` (each held back until those before it are out)."""
    waiting: dict[Any, Finished] = {}
    finished = iter(finished)
    for key in keys:
        while key not in waiting:
            item = next(finished, None)
            if item is None:
                return
            waiting[item.key] = item
        yield waiting.pop(key)
