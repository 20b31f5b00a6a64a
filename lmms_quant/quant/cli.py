"""``lmms-quant quantize``: quantize a checkpoint without evaluating it, write the report (and the model).

    lmms-quant quantize --model quant_blip2 \\
        --model_args pretrained=Salesforce/blip2-opt-2.7b,method=gptq,bits=4,component=vit \\
        --report r.json [--save DIR] [--export DIR] [--device cuda]

``--model`` and ``--model_args`` are exactly what lmms-eval takes: the same wrapper validates the
arguments (recipe and wrapper keys, before anything is loaded), the same loader loads the
checkpoint, and the same verb (`lmms_quant.quantize`) quantizes it, through the weight cache when
``weight_cache=DIR`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmms_quant.model_ids import MODEL_CLASSES


class UsageError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmms-quant quantize",
        description="Quantize a vision-language model (RTN/GPTQ/AWQ) and write the quantization report.",
    )
    # `quant` wraps an lmms-eval model object (which loads itself); every other wrapper loads through
    # the shared loader, which is what this command uses.
    parser.add_argument("--model", required=True, choices=sorted(m for m in MODEL_CLASSES if m != "quant"),
                        help="the lmms-quant model wrapper whose checkpoints these are (same as lmms-eval's --model)")
    parser.add_argument("--model_args", required=True,
                        help="comma-separated key=value, exactly as for lmms-eval: pretrained=..., the recipe keys, "
                             "weight_cache=DIR, ...")
    parser.add_argument("--report", required=True, help="where to write the JSON report")
    parser.add_argument("--save", default=None,
                        help="also save the quantized model, processor, integer codes and report to this new directory")
    parser.add_argument("--export", default=None,
                        help="also write a compressed-tensors (vLLM-loadable) packed checkpoint to this new directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """The wrappers' own validation and loader, then the engine's one verb (weight cache included)."""
    from lmms_quant.model_ids import model_class
    from lmms_quant.values import parse_model_args

    wrapper = model_class(args.model)
    kwargs = parse_model_args(args.model_args)
    if args.device is not None:
        kwargs["device"] = args.device
    wrapper_args, _, recipe = wrapper.validate_model_args(kwargs)  # before any loading
    save = Path(args.save) if args.save else None
    if save is not None and save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise UsageError(f"--save {str(save)!r} exists and is not empty; refusing to overwrite it")
    if args.export is not None:
        from lmms_quant.quant.export import check_new_dir, require_compressed_tensors

        check_new_dir(args.export)
        require_compressed_tensors()
    if recipe.is_noop:
        print("lmms-quant quantize: method=fp16 quantizes nothing; the report only sizes the model", file=sys.stderr)

    import lmms_quant
    from lmms_quant.model_wrappers.loading import load_pretrained

    processor, model = load_pretrained(wrapper.model_class, wrapper_args)
    keep_codes = save is not None or args.export is not None
    report = lmms_quant.quantize(model, processor, recipe, cache=wrapper_args.weight_cache,
                                 device=wrapper_args.device, keep_codes=keep_codes, progress=not args.no_progress)
    report.write_json(args.report)
    if save is not None:
        from lmms_quant.quant.saved import write_saved_run

        write_saved_run(model, processor, report, save)
    if args.export is not None:  # last: it packs the model in place
        from lmms_quant.quant.export import export_run

        export_run(model, processor, report, args.export, device=wrapper_args.device, report_path=args.report)
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

    try:
        return run(args)
    except (ValueError, ArchitectureError) as err:  # RecipeError, UsageError and the wrappers' own checks
        print(f"lmms-quant quantize: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lmms-quant quantize: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
