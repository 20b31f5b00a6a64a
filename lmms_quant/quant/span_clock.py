"""Durations of marked spans of work, without making the host wait for the device.

On CUDA a span is a pair of timing events on the current stream, read only after the caller has
waited anyway (a device wait per span would stall the queue the methods keep full); on the CPU it is
the host's clock. Spans are summed by name.
"""

from __future__ import annotations

import contextlib
import time

import torch


class SpanClock:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.events: dict[str, list] = {}
        self.host_s: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, name: str = "span"):
        if not self.cuda:
            started = time.perf_counter()
            try:
                yield
            finally:
                self.host_s[name] = self.host_s.get(name, 0.0) + time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self.events.setdefault(name, []).append((start, end))

    def by_name(self) -> dict[str, float]:
        """Seconds per span name so far (on CUDA: waits for the spans' last events)."""
        out = dict(self.host_s)
        for name, pairs in self.events.items():
            for _, end in pairs:
                end.synchronize()
            out[name] = out.get(name, 0.0) + sum(start.elapsed_time(end) for start, end in pairs) / 1e3
        return out

    def seconds(self) -> float:
        """Every span so far, summed."""
        return sum(self.by_name().values())


class Later:
    """A value worked out when first asked for, once (``fn()``): what a unit reports from the device
    (its spans' seconds, its statistics) is read after the host has queued the next unit's work."""

    _unset = object()

    def __init__(self, fn):
        self.fn, self.value = fn, self._unset

    def get(self):
        if self.value is self._unset:
            self.value, self.fn = self.fn(), None
        return self.value


def resolved(value):
    """``value``, or what it stands for if it is a `Later`."""
    return value.get() if isinstance(value, Later) else value


class HostRead:
    """Device tensors read on the host without making it wait for the queue behind them.

    The values are copied to pinned host memory behind the work queued so far on the current stream,
    and an event marks the copy's end: `values` waits for that event only, not for what the host
    queued after it (a ``.tolist()`` waits for the whole stream). On the CPU the values are read now."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.event, self.sizes = None, [t.numel() for t in tensors]
        if not tensors:
            self.host = torch.empty(0, dtype=torch.float64)
            return
        device = tensors[0].device
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
        if device.type == "cuda":
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flat

    def values(self) -> list[list[float]]:
        """Per tensor given, its values (flattened) as python floats."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        flat, out, start = self.host.tolist(), [], 0
        for size in self.sizes:
            out.append(flat[start:start + size])
            start += size
        return out
