"""A prompt's token ids exactly as the processor makes them, without transforming each request's image.

The processor expands the image placeholder into the model's number of image tokens, a number that
depends on the processed image's *size* only (a fixed-size resize for BLIP-2 and LLaVA-1.5; a
size-dependent tiling for others). Transforming every request's image just to count its tokens
would cost a resize and normalisation per question (milliseconds each on a CPU). So the processor's
own call runs on a blank *stand-in* of the same size and mode, and while it runs the image processor
is replaced by one that transforms each stand-in once. The text path is the processor's own, so
every template, special token and expansion rule is kept; `PromptIds.check` compares the result with
the real call once per run and falls back to it (``exact``) if they ever differ.
"""

from __future__ import annotations

import contextlib
import copy
import logging

log = logging.getLogger(__name__)


class _TransformOnce:
    """Stands in for an image processor: each image object is transformed once, and a call with the same
    object repeated (a batch of prompts sharing one stand-in) repeats that one result."""

    def __init__(self, real, memo: dict):
        self._real, self._memo = real, memo

    def __call__(self, *args, **kwargs):
        images = kwargs.pop("images", None) if "images" in kwargs else (args[0] if args else None)
        args = args[1:] if args and images is args[0] else args
        flat = _leaves(images)  # processors may nest the images per prompt
        if not flat or any(image is not flat[0] for image in flat):
            return self._real(images, *args, **kwargs)
        key = (id(flat[0]), len(args), repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key not in self._memo:
            # The memo keeps the image alive, so its id stays unique.
            self._memo[key] = (flat[0], self._real([flat[0]], *args, **kwargs))
        one = self._memo[key][1]
        repeated = copy.copy(one)
        for name, value in one.items():
            repeated[name] = _repeat(value, len(flat))
        return repeated

    def __getattr__(self, name):
        return getattr(self._real, name)


def _leaves(images) -> list:
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _leaves(item)]
    return [] if images is None else [images]


def _repeat(value, n: int):
    """``value`` (one image's entry) for n identical images."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.expand(n, *value.shape[1:]) if value.shape[0] == 1 else value.repeat(n, *[1] * (value.dim() - 1))
    if isinstance(value, np.ndarray):
        return np.repeat(value, n, axis=0)
    if isinstance(value, list):
        return value * n
    raise TypeError(f"cannot repeat an image processor output of type {type(value).__name__}")


class PromptIds:
    """``processor_inputs(prompts, images per prompt)``: how the wrapper calls its processor (the stock
    path's own call, so every template flag and special-token rule is the stock path's)."""

    CHUNK = 256  # prompts per processor call
    KNOWN_MAX = 200_000  # distinct (prompt, image size) ids kept for reuse

    def __init__(self, processor, processor_inputs):
        self.processor = processor
        self.processor_inputs = processor_inputs
        self.exact = False
        self._stand_ins: dict = {}
        self._memo: dict = {}
        self._known: dict = {}
        self._checked = False

    def _stand_in(self, image):
        from PIL import Image

        key = (image.mode, image.size)
        if key not in self._stand_ins:
            self._stand_ins[key] = Image.new(image.mode, image.size)
        return self._stand_ins[key]

    @contextlib.contextmanager
    def _transform_once(self):
        real = self.processor.image_processor
        self.processor.image_processor = _TransformOnce(real, self._memo)
        try:
            yield
        finally:
            self.processor.image_processor = real

    def _call(self, prompts: list[str], images: list) -> list[list[int]]:
        batch = self.processor_inputs(prompts, [[image] for image in images])
        return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    def __call__(self, prompt: str, image) -> list[int]:
        return self.many([prompt], [image])[0]

    def many(self, prompts: list[str], images: list) -> list[list[int]]:
        """The processor's input_ids (unpadded) of each (prompt, one image) request."""
        if not prompts:
            return []
        if not self._checked:
            self.check(prompts[0], images[0])
        if self.exact:
            return [self._call([p], [i])[0] for p, i in zip(prompts, images)]
        out: list = [None] * len(prompts)
        # Ids depend on the prompt and the image's size and mode only (what `check` verified), so a
        # prompt repeated over images of one size (every caption request; a task's recurring
        # questions) goes through the processor once per run.
        todo: dict = {}  # (mode, size, prompt) -> the requests waiting for its ids
        for index, (prompt, image) in enumerate(zip(prompts, images)):
            key = (image.mode, image.size, prompt)
            if key in self._known:
                out[index] = list(self._known[key])
            else:
                todo.setdefault(key, []).append(index)
        by_stand_in: dict = {}
        for key, indices in todo.items():
            stand_in = self._stand_in(images[indices[0]])
            by_stand_in.setdefault(id(stand_in), (stand_in, []))[1].append(key)
        if len(self._known) + len(todo) > self.KNOWN_MAX:
            self._known.clear()
        with self._transform_once():
            for stand_in, keys in by_stand_in.values():
                for start in range(0, len(keys), self.CHUNK):
                    chunk = keys[start:start + self.CHUNK]
                    for key, ids in zip(chunk, self._call([key[2] for key in chunk], [stand_in] * len(chunk))):
                        self._known[key] = ids
                        for index in todo[key]:
                            out[index] = list(ids)
        return out

    def check(self, prompt: str, image) -> bool:
        """Compare the stand-in path with the real call on one request; use the real call if they differ."""
        self._checked = True
        real = self._call([prompt], [image])[0]
        try:
            with self._transform_once():
                fast = self._call([prompt, prompt], [self._stand_in(image)] * 2)
        except Exception as err:  # noqa: BLE001 - a processor that cannot take the stand-in keeps the real call
            log.warning("lmms-quant: prompt ids through a stand-in image failed (%s); using the full processor", err)
            fast = None
        self.exact = fast != [real, real]
        if self.exact and fast is not None:
            log.warning("lmms-quant: prompt ids depend on image content here; using the full processor per request")
        return not self.exact


__all__ = ["PromptIds"]
