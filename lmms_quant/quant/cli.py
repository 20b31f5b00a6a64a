"""``lmms-quant quantize``: quantize a checkpoint without evaluating it, write the report (and the model).

    lmms-quant quantize --model quant_blip2 \\
        --model_args pretrained=Salesforce/blip2-opt-2.7b,method=gptq,bits=4,component=vit \\
        --report r.json [--save DIR] [--export DIR] [--device cuda]

``--model_args`` takes the same keys as the lmms-eval wrappers' quantization plan, plus
``pretrained``, ``dtype`` (auto | float16 | bfloat16 | float32), ``trust_remote_code`` and
``revision``. The plan is validated before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODEL_CLASSES = {
    "quant_blip2": "Blip2ForConditionalGeneration",
    "quant_llava": "LlavaForConditionalGeneration",
    "quant_blip2_itm": "Blip2ForImageTextRetrieval",
}
LOAD_KEYS = ("pretrained", "dtype", "trust_remote_code", "revision")
DTYPES = ("auto", "float16", "bfloat16", "float32")


class UsageError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmms-quant quantize",
        description="Quantize a vision-language model (RTN/GPTQ/AWQ) and write the quantization report.",
    )
    parser.add_argument("--model", required=True, choices=sorted(MODEL_CLASSES),
                        help="which lmms-quant model family the checkpoint is")
    parser.add_argument("--model_args", required=True,
                        help="comma-separated key=value: pretrained=..., and the quantization plan keys")
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    parser.add_argument("--save", default=None,
                        help="also save the quantized model, processor, integer codes and report to this new directory")
    parser.add_argument("--export", default=None,
                        help="also write a compressed-tensors (vLLM-loadable) packed checkpoint to this new directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def parse_model_args(text: str) -> dict:
    from lmms_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


def _dtype(value):
    import torch

    text = str(value).strip().lower()
    if text not in DTYPES:
        raise UsageError(f"dtype={value!r} is invalid; valid: {', '.join(DTYPES)}")
    return "auto" if text == "auto" else getattr(torch, text)


def _truthy(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none"):
        return False
    raise UsageError(f"{key}={value!r} is invalid; valid: true or false")


def run(args: argparse.Namespace) -> int:
    from lmms_quant.quant.plan import QuantPlan

    kwargs = parse_model_args(args.model_args)
    plan = QuantPlan.from_kwargs(kwargs, other_valid_keys=LOAD_KEYS)  # before any loading
    pretrained = kwargs.get("pretrained")
    if pretrained in (None, "", "None"):
        raise UsageError("pretrained: missing from --model_args; valid: a hub id or a local checkpoint directory")
    dtype = _dtype(kwargs.get("dtype", "auto"))
    trust_remote_code = _truthy("trust_remote_code", kwargs.get("trust_remote_code", False))
    revision = kwargs.get("revision")
    save = Path(args.save) if args.save else None
    if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise UsageError(f"--save {str(save)!r} exists and is not empty; refusing to overwrite it")
    if args.export is not None:
        from lmms_quant.quant.export import check_new_dir, require_compressed_tensors

        check_new_dir(args.export)
        require_compressed_tensors()
    if plan.is_noop:
        print("lmms-quant quantize: method=fp16 quantizes nothing; the report only sizes the model", file=sys.stderr)

    import torch
    import transformers
    from transformers import AutoProcessor

    from lmms_quant.quant import quantize_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = {"trust_remote_code": trust_remote_code}
    if revision not in (None, "None"):
        load["revision"] = str(revision)
    model_class = getattr(transformers, MODEL_CLASSES[args.model])
    processor = AutoProcessor.from_pretrained(str(pretrained), **load)
    model = model_class.from_pretrained(str(pretrained), dtype=dtype, **load).eval()
    keep_codes = save is not None or args.export is not None
    report = quantize_model(model, processor, plan, device=device, keep_codes=keep_codes, progress=not args.no_progress)
    report.write_json(args.report)
    if save is not None:
        from lmms_quant.quant.saved import write_saved_run

        write_saved_run(model, processor, report, save)
    if args.export is not None:  # last: it packs the model in place
        from lmms_quant.quant.export import export_run

        export_run(model, processor, report, args.export, device=device, report_path=args.report)
    print(report.summary())
    print(f"report: {args.report}" + (f"; quantized model: {save}" if save else "")
          + (f"; packed checkpoint: {args.export}" if args.export else ""))
    return 0


def main(argv=None) -> int:
    """Entry point for `lmms-quant quantize ...`; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from lmms_quant.quant.archs import ArchitectureError
    from lmms_quant.quant.export import ExportError
    from lmms_quant.quant.plan import PlanError

    try:
        return run(args)
    except (PlanError, UsageError, ArchitectureError, ExportError) as err:
        print(f"lmms-quant quantize: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lmms-quant quantize: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
