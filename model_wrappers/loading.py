"""The wrappers' own arguments and the one loader every entry point uses (lmms-eval wrappers, `lmms-quant quantize`).

Everything that is not a wrapper key goes to `Recipe.parse`; both are validated before anything is
loaded, so a misspelt key fails in a second, naming the key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import lmms_quant
from lmms_quant.values import bad, is_unset, parse_bool, parse_dtype, parse_positive_int, text

# Keys every wrapper accepts. batch_size / max_batch_size / device also arrive from lmms-eval's own
# --batch_size / --max_batch_size / --device; lmms_quant_version is folded in by `lmms-quant eval`
# so that lmms-eval's response cache never mixes results of two lmms-quant versions.
# fast_generate and feature_cache change how fast results come, never which: they are wrapper keys,
# not recipe keys (the recipe digest, weight cache and reports ignore them); given, they stay in
# model_args, so lmms-eval's response cache never answers a fast_generate=false check from a fast run.
BASE_WRAPPER_KEYS = (
    "pretrained", "revision", "dtype", "device", "device_map", "trust_remote_code",
    "batch_size", "max_batch_size", "report_dir", "weight_cache", "lmms_quant_version",
    "fast_generate", "feature_cache",
)


def parse_batch_size(value) -> int | str:
    """A positive int, or "auto" (lmms-eval's --batch_size auto): the largest batch that fits, found on OOM."""
    spelled = str(value).strip()
    if spelled.lower() == "auto":
        return "auto"
    if not spelled.isdigit() or int(spelled) < 1:
        raise ValueError(f"batch_size: got {value!r}; valid: a positive integer or 'auto'")
    return int(spelled)


def parse_fast_generate(value) -> bool | None:
    """true / false, or None for "auto" (unset): on where the device is CUDA."""
    if is_unset(value) or str(value).strip().lower() == "auto":
        return None
    try:
        return parse_bool("fast_generate", value)
    except ValueError:
        raise bad("fast_generate", value, "true, false or auto (on for CUDA, off for CPU)") from None


def parse_max_batch_size(value) -> int | None:
    if is_unset(value):
        return None
    return parse_positive_int("max_batch_size", value, "where batch_size=auto starts")


def parse_device(value) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(value))
    except RuntimeError as err:
        raise ValueError(f"device: got {value!r}; valid: a torch device such as 'cpu', 'cuda', 'cuda:1'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {value!r}, but CUDA is not available here; valid: 'cpu'")
    return device


def parse_device_map(value):
    value = text(value)
    if value is not None and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"device_map: got {value!r}; valid: 'auto', 'balanced', 'sequential', "
                             f"a device, or a JSON object of module name -> device") from err
    return value


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id: absolute, relative (./ ../ ~), or more than one '/'."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_pretrained(pretrained: str) -> str:
    """A local directory that exists, or a hub id; a path that does not exist names the key and the path."""
    if looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_dir():
            what = "is a file, not a checkpoint directory" if path.exists() else "no such directory"
            raise ValueError(f"pretrained={pretrained!r} is invalid ({what}); valid: a local checkpoint "
                             f"directory (with config.json) or a Hugging Face hub id such as 'org/name'")
        return str(path)
    return pretrained


@dataclass(frozen=True)
class WrapperArgs:
    """The wrapper's own (non-quantization) arguments, validated."""

    pretrained: str
    revision: str | None
    dtype: Any  # torch.dtype or "auto"
    device: torch.device
    device_map: Any
    trust_remote_code: bool
    batch_size: int  # with auto_batch: where the search starts (max_batch_size, default 64)
    report_dir: str | None
    weight_cache: str | None  # a WeightCache root: reuse quantized weights across tasks/runs
    auto_batch: bool = False
    max_batch_size: int | None = None
    fast_generate: bool | None = None  # None: on where the device is CUDA
    feature_cache: str | None = None  # a directory: image features shared by configurations with FP vision


def split_model_args(kwargs: dict, wrapper_keys: Sequence[str]) -> tuple[dict, dict]:
    """(wrapper keys, the rest); the rest is the recipe's to validate."""
    own = {k: v for k, v in kwargs.items() if k in wrapper_keys}
    rest = {k: v for k, v in kwargs.items() if k not in wrapper_keys}
    return own, rest


def parse_wrapper_args(own: dict) -> WrapperArgs:
    pretrained = text(own.get("pretrained"))
    if pretrained is None:
        raise ValueError("pretrained: missing; valid: a Hugging Face hub id or a local checkpoint directory")
    version = text(own.get("lmms_quant_version"))
    if version is not None and version != lmms_quant.__version__:
        raise ValueError(f"lmms_quant_version: got {version!r}; valid: {lmms_quant.__version__!r} "
                         f"(the installed lmms-quant; results of another version must not be mixed)")
    try:
        dtype = parse_dtype("dtype", own.get("dtype", "auto"))
        trust_remote_code = parse_bool("trust_remote_code", own.get("trust_remote_code", False))
        fast_generate = parse_fast_generate(own.get("fast_generate"))
    except ValueError as err:
        raise ValueError(str(err)) from None
    batch_size = parse_batch_size(own.get("batch_size", 1))
    max_batch_size = parse_max_batch_size(own.get("max_batch_size"))
    settings = dict(
        revision=text(own.get("revision")),
        dtype=dtype,
        device=parse_device(None if is_unset(own.get("device")) else own.get("device")),
        device_map=parse_device_map(own.get("device_map")),
        trust_remote_code=trust_remote_code,
        batch_size=(max_batch_size or 64) if batch_size == "auto" else batch_size,
        report_dir=text(own.get("report_dir")),
        weight_cache=text(own.get("weight_cache")),
        auto_batch=batch_size == "auto",
        max_batch_size=max_batch_size,
        fast_generate=fast_generate,
        feature_cache=text(own.get("feature_cache")),
    )
    return WrapperArgs(pretrained=pretrained, **settings)


def load_pretrained(model_class, args: WrapperArgs):
    """(processor, model) through from_pretrained: weights from safetensors, remote code only if asked.

    A hub id that is not in the local cache while offline gets a message that says so."""
    from lmms_quant.processors import load_processor

    check_pretrained(args.pretrained)
    load = {"trust_remote_code": args.trust_remote_code}
    if args.revision is not None:
        load["revision"] = args.revision
    try:
        processor = load_processor(args.pretrained, **load)
        model = model_class.from_pretrained(args.pretrained, dtype=args.dtype, device_map=args.device_map,
                                            use_safetensors=True, **load)
    except OSError as err:
        if not Path(args.pretrained).exists() and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ValueError(f"pretrained={args.pretrained!r} is invalid (a hub id that is not in the local hub "
                             f"cache, and HF_HUB_OFFLINE is set); valid: a local checkpoint directory, or download "
                             f"it first ({err})") from err
        raise
    if args.device_map is None:
        model.to(args.device)
    return processor, model.eval()


# --------------------------------------------------------------------------- where lmms-eval writes


def _cli_args(argv: Sequence[str]) -> argparse.Namespace:
    # allow_abbrev=False: with it, lmms-eval's `--model x` would be read as a prefix of --model_args.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", default=None)
    parser.add_argument("--model_args", default=None)
    return parser.parse_known_args(list(argv))[0]


def cli_output_path(argv: Sequence[str] | None = None) -> str | None:
    """The running lmms-eval command's --output_path, if any (None under the Python API)."""
    return _cli_args(sys.argv[1:] if argv is None else argv).output_path


def model_name_sanitized(pretrained: str, argv: Sequence[str] | None = None) -> str:
    """The results sub-directory name, computed as lmms-eval computes it.

    lmms-eval derives it from the raw --model_args string (first of peft=, delta=, pretrained=, ...
    found as a substring), then keeps the last two path parts; read that string when it is on the
    command line so the report lands next to results.json, else fall back to ``pretrained``.
    """
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lmms_eval.utils import sanitize_model_name

    raw = _cli_args(sys.argv[1:] if argv is None else argv).model_args
    name = GeneralConfigTracker._get_model_name(raw) if raw else ""
    return sanitize_model_name(name or pretrained)
