"""Requests made ready for the fast path on CPU threads, one chunk ahead of the GPU.

Per request: its doc (lmms-eval's dataset row: the image is decoded here), its prompt and image
(the wrapper's `prompt_and_images`) and the image's content hash; per distinct image: its features
from the disk cache, or its pixel values (the image processor alone, once `VisionFeatures.check_pixels`
has allowed it). This is most of the CPU work of an evaluation (decoding a 336-px PNG takes
milliseconds), so it runs in a pool of threads (PIL's decoders and torch release the GIL) while the GPU
serves the previous chunk. No tokenizer is used here: one is not shared safely between threads, and
the main thread tokenizes prompts and decodes answers meanwhile.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from lmms_quant.values import parse_positive_int

from .vision_cache import image_key

# Few threads: the main thread launches the GPU's work and needs the interpreter lock often; with 8
# preparing threads busy, BLIP-2's vision and prefill phases took ~3x their GPU time on an H200 (the
# preparation itself needs ~1 core at 250 images/s).
THREADS_ENV = "LMMS_QUANT_PREPARE_THREADS"


def preparing_threads() -> int:
    """``LMMS_QUANT_PREPARE_THREADS`` if set, else 3 (at most the CPU count)."""
    value = os.environ.get(THREADS_ENV)
    if value is None:
        return min(3, os.cpu_count() or 1)
    return parse_positive_int(THREADS_ENV, value, "e.g. 3")


@dataclass
class Chunk:
    items: list[tuple]  # (index, ChatRequest, prompt, images, content key or None when not one image)
    ready: dict = field(default_factory=dict)  # content key -> VisionFeatures.ready(...)


class Preparer:
    def __init__(self, wrapper, threads: int | None = None):
        self.wrapper = wrapper
        threads = threads or preparing_threads()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lmms-quant-prepare")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmms-quant-ahead")

    def docs(self, requests, indices: list[int]) -> list[tuple]:
        wrapper = self.wrapper

        def one(i):
            request = wrapper.chat_request(requests[i].args)
            prompt, images = wrapper.prompt_and_images(request)
            return i, request, prompt, images, image_key(images[0]) if len(images) == 1 else None

        return list(self._pool.map(one, indices))

    def images(self, items: list[tuple], vision) -> dict:
        """Disk features or pixel values of each distinct image of ``items`` that memory does not hold."""
        first = {}
        for item in items:
            if item[4] is not None and item[4] not in first:
                first[item[4]] = item[3][0]
        found = self._pool.map(lambda key: (key, vision.ready(key, first[key])), list(first))
        return {key: got for key, got in found if got is not None}

    def chunk(self, requests, indices: list[int], vision=None) -> Chunk:
        items = self.docs(requests, indices)
        return Chunk(items, self.images(items, vision) if vision is not None else {})

    def submit(self, requests, indices: list[int], vision=None) -> Future:
        return self._ahead.submit(self.chunk, requests, indices, vision)


__all__ = ["Chunk", "Preparer", "THREADS_ENV", "preparing_threads"]
