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
