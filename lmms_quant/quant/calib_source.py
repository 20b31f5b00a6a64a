"""Where calibration samples come from, checked when the recipe is parsed — before any model is loaded.

A source is ``synthetic`` (image+text pairs of the shapes world), ``hf:<path>[:<name>]:<split>``
(a hub split; what it holds is known only once it is loaded), or a local path:

- ``.txt``: text only, one sample per paragraph (blocks separated by a blank line) when the file has
  blank lines, else one per line;
- ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` or a ``save_to_disk`` directory: rows with a text
  column (one of `TEXT_COLUMNS`, or an answer column with an optional ``question``) and, for
  image+text, an image column (a feature of type Image, or a column named ``image``/``images``).
  Without an image column the source is text only.

Parsing reads only what is cheap: a parquet file's schema, the first record of a json/jsonl file, a
csv header, a directory's ``dataset_info.json``, the first MiB of a text file. Stdlib only (pyarrow,
for a parquet schema, imported when needed).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

from lmms_quant.values import bad

from .method import RecipeError

TEXT_COLUMNS = ("text", "caption", "captions", "sentences", "sentence")
ANSWER_COLUMNS = ("answer", "multiple_choice_answer", "answers", "label")
IMAGE_COLUMNS = ("image", "images")
FILE_TYPES = ("parquet", "json", "jsonl", "csv", "txt")
IMAGE_TEXT, TEXT_ONLY = "image+text", "text"
_PEEK_BYTES = 1 << 20


@dataclass(frozen=True)
class CalibSource:
    """Where calibration samples come from: ``synthetic``, a hub dataset split, or a local path."""

    kind: str  # "synthetic" | "hf" | "local"
    path: str | None = None  # hub path, or an absolute local path
    name: str | None = None  # hub config name
    split: str | None = None
    # What the source holds: IMAGE_TEXT, TEXT_ONLY, or None (a hub split: known once loaded). Derived
    # from the data, so not part of the identity.
    modality: str | None = field(default=None, compare=False)

    VALID = ("synthetic, hf:<path>[:<name>]:<split>, or an existing local .txt/.parquet/.json/.jsonl/.csv file "
             "or save_to_disk dir")

    @classmethod
    def parse(cls, value) -> "CalibSource":
        if not isinstance(value, str):
            raise bad("calib", value, cls.VALID, f"a {type(value).__name__}", RecipeError)
        spelled = value.strip()
        if spelled.lower() == "synthetic":
            return cls("synthetic", modality=IMAGE_TEXT)
        if spelled.startswith("hf:"):
            parts = spelled[3:].split(":")
            if len(parts) == 2:
                path, name, split = parts[0], None, parts[1]
            elif len(parts) == 3:
                path, name, split = parts
            else:
                raise bad("calib", value, cls.VALID, "hf: needs <path>:<split> or <path>:<name>:<split>", RecipeError)
            if not path or not split or name == "":
                raise bad("calib", value, cls.VALID, "an empty part", RecipeError)
            return cls("hf", path, name, split)
        if os.path.exists(spelled):
            path = os.path.abspath(spelled)
            return cls("local", path, modality=inspect_local(path, value))
        raise bad("calib", value, cls.VALID, "no such file or directory", RecipeError)

    @property
    def spec(self) -> str:
        """The canonical spelling (what ``calib=`` says in to_model_args)."""
        if self.kind == "synthetic":
            return "synthetic"
        if self.kind == "local":
            return self.path
        return "hf:" + ":".join(p for p in (self.path, self.name, self.split) if p is not None)

    @property
    def text_only(self) -> bool:
        return self.modality == TEXT_ONLY


def file_type(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def modality_of_columns(columns: dict[str, str | None], spelled) -> str:
    """IMAGE_TEXT or TEXT_ONLY for rows with these columns (name -> feature type, when known)."""
    names = list(columns)
    if not any(c in columns for c in TEXT_COLUMNS + ANSWER_COLUMNS):
        raise RecipeError(f"calib={spelled!r} is invalid: no text column in {names}; valid: rows with one of "
                          f"{', '.join(TEXT_COLUMNS + ANSWER_COLUMNS)}")
    has_image = any(kind == "Image" or name in IMAGE_COLUMNS for name, kind in columns.items())
    return IMAGE_TEXT if has_image else TEXT_ONLY


def inspect_local(path: str, spelled) -> str:
    """The modality of a local source, from its schema or first rows; a RecipeError if it cannot be used."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json")) as handle:
                splits = json.load(handle).get("splits", [])
            raise RecipeError(f"calib={spelled!r} is invalid: it holds several splits {splits}; valid: one split's "
                              f"directory, or hf:{path}:<split>")
        info = os.path.join(path, "dataset_info.json")
        if not os.path.exists(info):
            raise RecipeError(f"calib={spelled!r} is invalid: a directory without dataset_info.json; valid: a "
                              f"datasets save_to_disk directory, or a data file")
        with open(info) as handle:
            features = json.load(handle).get("features", {})
        return modality_of_columns({k: _feature_type(v) for k, v in features.items()}, spelled)
    kind = file_type(path)
    if kind not in FILE_TYPES:
        raise RecipeError(f"calib={spelled!r} is invalid: unknown file type .{kind}; valid: "
                          f"{', '.join('.' + t for t in FILE_TYPES)}")
    try:
        if kind == "txt":
            with open(path, encoding="utf-8") as handle:
                if not handle.read(_PEEK_BYTES).strip():
                    raise RecipeError(f"calib={spelled!r} is invalid: the text file is empty; valid: one sample "
                                      f"per line or paragraph")
            return TEXT_ONLY
        if kind == "parquet":
            return modality_of_columns(_parquet_columns(path), spelled)
        if kind == "csv":
            with open(path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), None)
            if not header:
                raise RecipeError(f"calib={spelled!r} is invalid: the csv file has no header row; valid: a header "
                                  f"naming a text column")
            return modality_of_columns({c.strip(): None for c in header}, spelled)
        return modality_of_columns({c: None for c in _first_json_record(path, spelled)}, spelled)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, RecipeError):
            raise
        raise RecipeError(f"calib={spelled!r} is invalid: cannot read it as .{kind} ({err}); valid: "
                          f"{CalibSource.VALID}") from None


def _feature_type(feature) -> str | None:
    """A datasets feature's type name ("Image", "Value", ...); None for sequences and unknowns."""
    return feature.get("_type") if isinstance(feature, dict) else None


def _parquet_columns(path: str) -> dict[str, str | None]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    features = {}
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        features = json.loads(meta).get("info", {}).get("features", {})
    columns = {}
    for name in schema.names:
        kind = _feature_type(features.get(name))
        arrow = schema.field(name).type
        if kind is None and getattr(arrow, "num_fields", 0) and {arrow.field(i).name for i in range(arrow.num_fields)} >= {"bytes"}:
            kind = "Image"  # a struct of encoded bytes, as datasets stores images
        columns[name] = kind
    return columns


def _first_json_record(path: str, spelled) -> dict:
    with open(path, encoding="utf-8") as handle:
        head = handle.read(_PEEK_BYTES)
    text = head.lstrip()
    if text.startswith("["):
        text = text[1:].lstrip()
    try:
        record, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as err:
        raise RecipeError(f"calib={spelled!r} is invalid: its first record is not JSON ({err.msg}); valid: JSON "
                          f"lines, or a JSON list of records") from None
    if not isinstance(record, dict):
        raise RecipeError(f"calib={spelled!r} is invalid: its first record is a {type(record).__name__}, not an "
                          f"object with columns; valid: records such as {{\"text\": ...}}")
    return record


def read_text_samples(path: str) -> list[str]:
    """A .txt source's samples: paragraphs when the file has blank lines, else lines (blank ones dropped)."""
    with io.open(path, encoding="utf-8") as handle:
        content = handle.read()
    lines = content.splitlines()
    if any(not line.strip() for line in lines[:-1]) and sum(1 for line in lines if line.strip()) > 1:
        paragraphs, current = [], []
        for line in lines:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        return paragraphs
    return [line.strip() for line in lines if line.strip()]


__all__ = ["ANSWER_COLUMNS", "CalibSource", "IMAGE_COLUMNS", "IMAGE_TEXT", "TEXT_COLUMNS", "TEXT_ONLY",
           "inspect_local", "read_text_samples"]
