"""A batch function replayed as CUDA graphs: one graph per bucket of batch sizes.

The vision tower and connector are ~800 small kernel launches per batch (ViT-g: 39 blocks). Launched
one by one from Python they keep pace with the GPU only while nothing else wants the interpreter; in
an evaluation the threads preparing the next requests (image decoding, transforms) hold it often, and
the measured vision time of BLIP-2 was 3x its GPU time (292 ms against 94 ms per 64 images on an
H200). Replayed as one graph, a batch is one launch.

A batch of n rows runs in the graph of the next power of two (rows past n repeat row 0: real inputs,
their outputs are dropped). The graphs share one memory pool; a graph's output buffer may be
overwritten by the next replay of any of them, so the caller copies what it keeps before calling
again (`VisionFeatures` clones each image's features at once). Off CUDA, or after a capture fails
(logged, and counted in ``stats``), the function runs eagerly; an out-of-memory error during a capture
drops the graphs and is raised, so that the batch sizing retries smaller (`batch_size.BatchSizes`).
"""

from __future__ import annotations

import logging

import torch

from .batch_size import is_out_of_memory

log = logging.getLogger(__name__)


def bucket(n: int) -> int:
    """The graph size serving a batch of n rows: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


class GraphedBatches:
    def __init__(self, fn, device):
        self.fn = fn
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self._graphs: dict = {}  # (bucket, row shape, dtype) -> (graph, static input, static output)
        self._pool = None
        self.stats = {"captures": 0, "replays": 0, "eager_calls": 0, "error": None}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.stats["error"] is not None:
            self.stats["eager_calls"] += 1
            return self.fn(x)
        n, size = x.shape[0], bucket(x.shape[0])
        key = (size, tuple(x.shape[1:]), x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(size, x)
            except Exception as err:  # noqa: BLE001 - a failed capture falls back to eager calls, but for OOM
                if is_out_of_memory(err):
                    self.release()
                    raise  # the batch sizing (`batch_size.BatchSizes`) retries smaller; graphs stay on
                self.stats["error"] = f"{type(err).__name__}: {err}"
                log.warning("lmms-quant: vision batches not captured as CUDA graphs (%s); running eagerly", err)
                torch.cuda.synchronize(self.device)
                self.stats["eager_calls"] += 1
                return self.fn(x)
        graph, static_in, static_out = entry
        static_in[:n].copy_(x)
        if n < size:
            static_in[n:].copy_(x[:1].expand(size - n, *x.shape[1:]))
        graph.replay()
        self.stats["replays"] += 1
        return static_out[:n]

    def release(self) -> None:
        """Drop every graph and its memory pool (they are captured again when next needed)."""
        self._graphs.clear()
        self._pool = None

    def _capture(self, size: int, x: torch.Tensor):
        static_in = x[:1].expand(size, *x.shape[1:]).clone()
        static_in[:x.shape[0]].copy_(x)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.fn(static_in)  # warm-up: lazy initialisations and kernel selection outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the threads preparing the next requests must not void this capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        if not isinstance(static_out, torch.Tensor):
            raise TypeError(f"a graphed batch function must return one tensor, not {type(static_out).__name__}")
        self.stats["captures"] += 1
        return graph, static_in, static_out


__all__ = ["GraphedBatches", "bucket"]
