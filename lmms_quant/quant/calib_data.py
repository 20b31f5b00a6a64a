"""Calibration data: samples from a source, and the batches the model is run on.

- Sources (`calib_source.CalibSource`): ``synthetic`` (lmms_quant.fixtures' seeded shapes world),
  ``hf:<path>[:<name>]:<split>`` (datasets.load_dataset, which also reads local dataset dirs), a local
  parquet/json/jsonl/csv file or ``save_to_disk`` directory (image+text, or text only), or a ``.txt``
  file (text only). A source equal to a dataset being evaluated is refused.
- Styles (``calib_style``), made by the model's own processor:
  - ``chat``: the family's prompt format — BLIP-2 "Question: … Answer: …" or a bare caption (T5 gets
    the answer as decoder labels), LLaVA and the chat-template families (prompt style ``chat``) their
    chat template, the retrieval model its image-text pair; a text-only sample gets the same
    wrapping without an image;
  - ``caption``: the image and its text, no question wrapper, no chat template;
  - ``raw``: the plain text alone, tokenized (no image, no template), as llm-compressor calibrates
    a language model.
  Batches without images run the model where it takes text alone: BLIP-2's language model (its
  wrapper requires pixel values), every other model whole. For an encoder-decoder language model a
  sample without a question is the encoder input and, teacher-forced, the decoder labels.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .calib_source import ANSWER_COLUMNS, IMAGE_COLUMNS, TEXT_COLUMNS, CalibSource, file_type, read_text_samples
from .method import RecipeError

CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."
_QA = re.compile(r"^\s*Question:\s*(?P<q>.*?)\s*Answer:\s*(?P<a>.*?)\s*$", re.S)
# Where a text-only batch enters the model, per prompt style; absent: the model itself.
TEXT_ENTRY = {"blip2_causal": "language_model", "blip2_seq2seq": "language_model"}


@dataclass
class CalibSample:
    image: object  # PIL.Image.Image, or None for a text-only sample
    prompt: str | None  # a question; None for a caption / plain-text sample
    response: str

    @property
    def text(self) -> str:
        """The sample's words, without any prompt format."""
        return f"{self.prompt} {self.response}" if self.prompt else self.response


def sample_from_text(image, text: str) -> CalibSample:
    match = _QA.match(text)
    if match:
        return CalibSample(image, match.group("q"), match.group("a"))
    return CalibSample(image, None, text.strip())


# --------------------------------------------------------------------------- sources


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def check_not_evaluated(source: CalibSource, evaluated_datasets: Sequence) -> None:
    """Refuse a calibration source that is one of the evaluated (dataset_path, dataset_name, split)."""
    calib = source.spec
    if source.kind == "synthetic":
        return
    for entry in evaluated_datasets or ():
        path, name, split = (list(entry) + [None, None, None])[:3]
        if path is None:
            continue
        path = str(path)
        clash = False
        if source.kind == "hf":
            clash = (_same_path(source.path, path) and (source.name or None) == (name or None)
                     and source.split == split)
        else:
            local = source.path
            inside = (os.path.isdir(path)
                      and os.path.realpath(local).startswith(os.path.realpath(path) + os.sep)
                      and split is not None and split in os.path.relpath(local, path).replace(os.sep, "/"))
            clash = _same_path(local, path) or inside
        if clash:
            raise RecipeError(
                f"calib={calib!r} is invalid: it is the evaluated split ({path}, {name}, {split}); calibrating "
                f"on test data inflates scores; valid: a disjoint split or dataset, or synthetic")


def _load_rows(source: CalibSource):
    import datasets

    if source.kind == "hf":
        return datasets.load_dataset(source.path, source.name, split=source.split)
    path = source.path
    if os.path.isdir(path):
        return datasets.load_from_disk(path)  # one split: checked when the recipe was parsed
    builder = {"parquet": "parquet", "json": "json", "jsonl": "json", "csv": "csv"}[file_type(path)]
    return datasets.load_dataset(builder, data_files=path, split="train")


def _first_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("answer", "raw", "text", "caption"):
            if isinstance(value.get(key), str):
                return value[key]
    if isinstance(value, (list, tuple)) and value:
        return _first_text(value[0])
    return None


def _open_image(image):
    if isinstance(image, dict) and image.get("bytes") is not None:
        from PIL import Image

        image = Image.open(io.BytesIO(image["bytes"]))
    return image.convert("RGB")


def _row_sample(row: dict, image_column: str | None) -> CalibSample:
    image = _open_image(row[image_column]) if image_column else None
    for col in TEXT_COLUMNS:
        text = _first_text(row.get(col))
        if text:
            return sample_from_text(image, text)
    question = row.get("question")
    for col in ANSWER_COLUMNS:
        answer = _first_text(row.get(col))
        if answer:
            return CalibSample(image, question if isinstance(question, str) and question else None, answer)
    raise RecipeError(f"calibration rows have no text column; valid: one of {TEXT_COLUMNS + ANSWER_COLUMNS}")


def _too_few(calib: str, have: int, n: int) -> RecipeError:
    return RecipeError(f"calib={calib!r} is invalid: it has {have} samples but {n} are needed (calib_n plus "
                       f"report_holdout); valid: a larger source, or a smaller calib_n / report_holdout")


def load_samples(source: CalibSource, n: int, seed: int) -> list[CalibSample]:
    """``n`` calibration samples, the same for the same (source, n, seed); ``image`` is None for a
    text-only source. The first k of them do not depend on n."""
    calib = source.spec
    if source.kind == "synthetic":
        from lmms_quant.fixtures.datasets import calibration_samples

        return [sample_from_text(s["image"], s["text"]) for s in calibration_samples(n, seed)]
    if source.kind == "local" and file_type(source.path) == "txt":
        texts = read_text_samples(source.path)
        if len(texts) < n:
            raise _too_few(calib, len(texts), n)
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        return [sample_from_text(None, texts[i]) for i in order[:n]]
    rows = _load_rows(source)
    if len(rows) < n:
        raise _too_few(calib, len(rows), n)
    image_columns = [c for c, f in rows.features.items() if type(f).__name__ == "Image"] or (
        [c for c in IMAGE_COLUMNS if c in rows.column_names])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [_row_sample(rows[i], image_columns[0] if image_columns else None) for i in order[:n]]


# --------------------------------------------------------------------------- batches


class TokenMasks(dict):
    """A batch's token masks (key -> bool (batch, seq), True on real tokens) and, per mask and device,
    the flat indices of its real tokens, found once. Rows picked by an index tensor need no device
    synchronisation; a boolean-mask index waits for the GPU to count the rows, and a CPU mask moved
    per call waits for the copy: calibration picks real tokens at every Linear group of every batch,
    AWQ's search at every parent output of every candidate scale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._index: dict = {}

    def index(self, key: str, device) -> torch.Tensor:
        """int64 indices, on ``device``, of the True entries of the flattened mask ``key`` (row-major:
        the order boolean indexing gives)."""
        cached = self._index.get((key, str(device)))
        if cached is None:
            cached = self[key].reshape(-1).nonzero().squeeze(1).to(device)
            self._index[(key, str(device))] = cached
        return cached

    def real_rows(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """The rows of ``x`` (mask-shaped leading dims, or already flattened to one row per token) on
        real tokens, as ``x.reshape(-1, d)[mask.reshape(-1)]``."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index(key, x.device))


@dataclass
class Batch:
    inputs: dict  # tensors for model(**inputs)
    masks: TokenMasks = field(default_factory=TokenMasks)  # mask key -> bool (batch, seq): real tokens
    options: dict = field(default_factory=dict)  # non-tensor model kwargs
    entry: str | None = None  # the submodule to call (a text-only batch on BLIP-2: its language model)

    def __post_init__(self):
        if not isinstance(self.masks, TokenMasks):
            self.masks = TokenMasks(self.masks)

    def to(self, device, dtype) -> dict:
        moved = {}
        for key, value in self.inputs.items():
            if torch.is_floating_point(value):
                value = value.to(device=device, dtype=dtype)
            else:
                value = value.to(device)
            moved[key] = value
        return {**moved, **self.options}

    def run(self, model, device, dtype):
        """The model's (or its entry submodule's) forward on this batch."""
        module = model.get_submodule(self.entry) if self.entry else model
        return module(**self.to(device, dtype))


def _chat_prompt(processor, question: str | None, image: bool = True) -> str:
    if getattr(processor, "chat_template", None):
        content = ([{"type": "image"}] if image else []) + ([{"type": "text", "text": question}] if question else [])
        conversation = [{"role": "user", "content": content}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return f"USER: {'<image>' + chr(10) if image else ''}{question} ASSISTANT:"


def _encode(processor, images, texts) -> dict:
    if images is None:
        tokenizer = getattr(processor, "tokenizer", processor)
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
    else:
        encoded = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def _texts(style: str, calib_style: str, processor, samples: Sequence[CalibSample], with_images: bool) -> list[str]:
    """The text of each sample in ``calib_style`` for a model of prompt ``style``."""
    if calib_style == "raw":
        return [s.text for s in samples]
    if calib_style == "caption":
        if style == "chat":  # a user turn holding only the image; the text as the answer
            return [f"{_chat_prompt(processor, None)} {s.text}" for s in samples]
        token = getattr(processor, "image_token", None) if style in ("llava", "generic") else None
        return [f"{token}\n{s.text}" if token else s.text for s in samples]
    if style == "blip2_causal":
        return [f"Question: {s.prompt} Answer: {s.response}" if s.prompt else s.response for s in samples]
    if style == "blip2_itm":
        return [s.text for s in samples]
    if style in ("llava", "chat") or getattr(processor, "chat_template", None):
        if with_images:
            return [f"{_chat_prompt(processor, s.prompt or CAPTION_INSTRUCTION)} {s.response}" for s in samples]
        # Text only: a question and its answer as a turn; a plain text as the user's message.
        return [f"{_chat_prompt(processor, s.prompt, False)} {s.response}" if s.prompt
                else _chat_prompt(processor, s.response, False) for s in samples]
    return [s.text for s in samples]


def make_batch(processor, style: str, samples: Sequence[CalibSample], calib_style: str = "chat") -> Batch:
    """One batch of ``samples`` for a model of prompt ``style`` (the family's), in ``calib_style``."""
    if style not in ("blip2_causal", "blip2_seq2seq", "blip2_itm", "llava", "chat", "generic"):
        raise ValueError(f"prompt style: got {style!r}; valid: blip2_causal, blip2_seq2seq, blip2_itm, llava, chat, "
                         f"generic")
    if style == "chat" and not getattr(processor, "chat_template", None):
        raise ValueError(f"prompt style 'chat': {type(processor).__name__} has no chat_template; valid: a "
                         f"processor with a chat template, or the family's plain prompt style")
    with_images = calib_style != "raw" and all(s.image is not None for s in samples)
    if calib_style == "caption" and not with_images:
        raise RecipeError("calib_style=caption is invalid for text-only samples; valid: chat or raw")
    images = [s.image for s in samples] if with_images else None
    if images is not None and style == "chat":
        images = [[image] for image in images]  # one list per prompt: processors that count images per prompt need it
    entry = None if with_images else TEXT_ENTRY.get(style)
    if style == "blip2_seq2seq":
        if calib_style == "raw" or not with_images:
            encoder = [f"Question: {s.prompt} Answer:" if s.prompt and calib_style == "chat" else s.text
                       for s in samples]
            targets = [s.response if s.prompt and calib_style == "chat" else s.text for s in samples]
        else:
            encoder = [f"Question: {s.prompt} Answer:" if s.prompt and calib_style == "chat" else "" for s in samples]
            targets = [s.response if calib_style == "chat" else s.text for s in samples]
        inputs = _encode(processor, images, encoder)
        labels = processor.tokenizer(targets, return_tensors="pt", padding=True, padding_side="right")
        inputs["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        masks = {"attention_mask": inputs["attention_mask"].bool(), "decoder_mask": inputs["labels"] != -100}
        return Batch(inputs, masks, {"use_cache": False}, entry)
    inputs = _encode(processor, images, _texts(style, calib_style, processor, samples, with_images))
    if style == "blip2_itm":
        return Batch(inputs, {}, {"use_image_text_matching_head": True})
    masks = {"attention_mask": inputs["attention_mask"].bool()} if "attention_mask" in inputs else {}
    options = {"use_cache": False} if style in ("blip2_causal", "llava", "chat") else {}
    return Batch(inputs, masks, options, entry)


def make_batches(processor, style: str, samples: Sequence[CalibSample], batch_size: int,
                 calib_style: str = "chat") -> list[Batch]:
    return [make_batch(processor, style, samples[i:i + batch_size], calib_style)
            for i in range(0, len(samples), batch_size)]


__all__ = ["Batch", "CAPTION_INSTRUCTION", "CalibSample", "TEXT_ENTRY", "check_not_evaluated", "load_samples",
           "make_batch", "make_batches", "sample_from_text"]
