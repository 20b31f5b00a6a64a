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
    """Stands in for an image processor: the same answer for the same image objects, computed once."""

    def __init__(self, real, memo: dict):
        self._real, self._memo = real, memo

    def __call__(self, *args, **kwargs):
        images = kwargs.get("images", args[0] if args else None)
        flat = images if isinstance(images, (list, tuple)) else [images]
        key = (tuple(id(image) for image in flat), len(args), repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key not in self._memo:
            self._memo[key] = (flat, self._real(*args, **kwargs))  # keeps the images alive: ids stay unique
        return copy.copy(self._memo[key][1])

    def __getattr__(self, name):
        return getattr(self._real, name)


class PromptIds:
    def __init__(self, processor):
        self.processor = processor
        self.exact = False
        self._stand_ins: dict = {}
        self._memo: dict = {}
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

    def _call(self, prompt: str, image) -> list[int]:
        return self.processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()

    def __call__(self, prompt: str, image) -> list[int]:
        if not self._checked:
            self.check(prompt, image)
        if self.exact:
            return self._call(prompt, image)
        with self._transform_once():
            return self._call(prompt, self._stand_in(image))

    def check(self, prompt: str, image) -> bool:
        """Compare the stand-in path with the real call on one request; use the real call if they differ."""
        self._checked = True
        real = self._call(prompt, image)
        try:
            with self._transform_once():
                fast = self._call(prompt, self._stand_in(image))
        except Exception as err:  # noqa: BLE001 - a processor that cannot take the stand-in keeps the real call
            log.warning("lmms-quant: prompt ids through a stand-in image failed (%s); using the full processor", err)
            fast = None
        self.exact = fast != real
        if self.exact and fast is not None:
            log.warning("lmms-quant: prompt ids depend on image content here; using the full processor per request")
        return not self.exact


__all__ = ["PromptIds"]
