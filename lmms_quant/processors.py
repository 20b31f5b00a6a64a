"""Processors of image-text models where transformers' video processors cannot exist.

transformers 5.x builds every video processor on torchvision, and processors that own one
(Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA-OneVision, InternVL, SmolVLM) refuse to be constructed or
loaded without it: `AutoProcessor.from_pretrained` raises before the image path is ever used. A CPU
torch has no matching torchvision wheel (the PyPI one links CUDA torch), and lmms-quant only feeds
images and text. So, where torchvision is missing, such a processor is built as its own class with
the video processor left out: the same code for images and text, `isinstance` and the saved
`processor_class` unchanged, and any video input fails inside transformers as it would without one.
Where torchvision is installed nothing changes.
"""

from __future__ import annotations

import functools
import inspect


def video_processor_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def needs_video_processor(processor_class) -> bool:
    return "video_processor" in inspect.signature(processor_class.__init__).parameters


class _NoVideoProcessor:
    """Stands in for the video processor where a processor's own code reads video settings even for
    image-only input (SmolVLMProcessor.apply_chat_template reads num_frames and fps): the settings
    are None, and a video is refused."""

    num_frames = fps = None

    def __call__(self, *args, **kwargs):
        raise ValueError("videos: this processor was loaded without torchvision, so it has no video processor; "
                         "valid: images and text")


# Processor classes whose image+text use reads the video processor's settings (see _NoVideoProcessor).
_READS_VIDEO_SETTINGS = ("SmolVLMProcessor",)


@functools.cache
def _image_text_variant(processor_class):
    """``processor_class`` whose sub-processors are its own less the video processor.

    ProcessorMixin reads the sub-processors from ``get_attributes()`` when it checks, saves and loads
    them, so this one neither checks, saves nor loads a video processor; the constructor is the
    original (video_processor=None), so every other argument is saved and reloaded as before."""

    def get_attributes(cls):
        return [name for name in processor_class.get_attributes() if name != "video_processor"]

    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        # Some constructors (SmolVLM's) take video_processor without a default; loading passes None.
        kwargs.setdefault("video_processor", None)
        return super(variant, cls).from_args_and_dict(args, processor_dict, **kwargs)

    variant = type(processor_class.__name__, (processor_class,), {
        "get_attributes": classmethod(get_attributes), "from_args_and_dict": classmethod(from_args_and_dict),
        "__module__": processor_class.__module__,
        **({"video_processor": _NoVideoProcessor()} if processor_class.__name__ in _READS_VIDEO_SETTINGS else {}),
        "__doc__": f"{processor_class.__name__} for images and text only (no torchvision: no video processor)."})
    return variant


def processor_class_for_environment(processor_class):
    """``processor_class`` itself, or, without torchvision, its image+text variant (module docstring)."""
    if needs_video_processor(processor_class) and not video_processor_available():
        return _image_text_variant(processor_class)
    return processor_class


def build_processor(processor_class, *, image_processor, tokenizer, video_processor=None, **kwargs):
    """Construct ``processor_class``; its video processor only where this environment can have one."""
    cls = processor_class_for_environment(processor_class)
    if needs_video_processor(cls) and video_processor is None:
        # None given: the image+text variant with torchvision too, so a fixture is the same on every machine
        cls = _image_text_variant(processor_class)
    if needs_video_processor(cls):
        kwargs["video_processor"] = video_processor
    return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def _saved_processor_class(path) -> str | None:
    import json
    from pathlib import Path

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = Path(str(path)) / name
        if file.is_file():
            value = json.loads(file.read_text()).get("processor_class")
            if value:
                return value
    return None


def load_processor(path, **kwargs):
    """`AutoProcessor.from_pretrained(path)`; for a local directory whose saved processor class owns a
    video processor while torchvision is missing, that class's image+text variant instead."""
    import transformers
    from transformers import AutoProcessor

    if not video_processor_available():
        name = _saved_processor_class(path)
        processor_class = getattr(transformers, name, None) if name else None
        if processor_class is not None and needs_video_processor(processor_class):
            return _image_text_variant(processor_class).from_pretrained(path, **kwargs)
    return AutoProcessor.from_pretrained(path, **kwargs)


__all__ = ["build_processor", "load_processor", "needs_video_processor", "processor_class_for_environment",
           "video_processor_available"]
