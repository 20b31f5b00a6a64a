"""``batch_size=auto``: per task shape, the largest batch that fits, found by halving on out-of-memory.

As lm-eval-harness does (accelerate's ``find_executable_batch_size``): the first batch of a shape is
tried at ``max_batch_size`` (lmms-eval's ``--max_batch_size``, default 64); on out-of-memory the
caches are released and the same requests are tried at half the size, down to 1. The size that
worked is kept for that shape (a task's generation settings and prompt length), so the search runs
once per model and shape. A trial that fits is the real batch: nothing is computed twice.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

DEFAULT_AUTO_START = 64
OOM_MESSAGES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate memory")


def is_out_of_memory(err: BaseException | None) -> bool:
    """An allocation failure, also when wrapped (the wrappers re-raise generation errors with context)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    while err is not None:
        if isinstance(err, (oom, MemoryError)) or any(m in str(err) for m in OOM_MESSAGES):
            return True
        err = err.__cause__
    return False


class BatchSizes:
    def __init__(self, auto: bool, fixed: int, start: int | None, release: Callable[[], None]):
        self.auto, self.fixed = auto, fixed
        self.start = start or DEFAULT_AUTO_START
        self.release = release  # frees what the failed attempt left allocated
        self.sizes: dict[str, int] = {}  # shape -> size that fits (lmms-eval reports lm.batch_sizes)

    @property
    def largest(self) -> int:
        """The largest batch any shape gets (where an auto search starts)."""
        return self.start if self.auto else self.fixed

    def size(self, shape: str) -> int:
        return self.sizes.get(shape, self.start) if self.auto else self.fixed

    def fits(self, shape: str, size: int) -> None:
        if self.auto:
            self.sizes.setdefault(shape, size)

    def can_retry(self, err: BaseException, size: int) -> bool:
        return self.auto and size > 1 and is_out_of_memory(err)

    def smaller(self, size: int, err: BaseException) -> int:
        log.info("lmms-quant: a batch of %d does not fit (%s); trying %d", size, type(err).__name__, size // 2)
        self.release()
        return size // 2

    def serve(self, items: list, shape: str, serve: Callable[[list, int], list]) -> list:
        """``serve(batch, size)`` over ``items`` in order, in batches of the shape's size (halved on an
        out-of-memory error under batch_size=auto; ``size`` is the batch size being tried)."""
        size, out, pos = self.size(shape), [], 0
        while pos < len(items):
            batch = items[pos:pos + size]
            try:
                results = serve(batch, size)
            except Exception as err:
                if not self.can_retry(err, size):
                    raise
                size = self.smaller(size, err)
                continue
            self.fits(shape, size)
            out.extend(results)
            pos += len(batch)
        return out


__all__ = ["BatchSizes", "DEFAULT_AUTO_START", "OOM_MESSAGES", "is_out_of_memory"]
