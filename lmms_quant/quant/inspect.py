"""``lmms-quant inspect``: what a model is made of, and what a plan would quantize, without calibrating.

    lmms-quant inspect --model quant_llava --model_args pretrained=llava-hf/llava-1.5-7b-hf[,method=gptq,bits=4,...] [--json]

``--model`` is an lmms-quant wrapper id and ``--model_args`` the string that wrapper takes (its own
keys and the quantization plan, validated as the wrapper validates them, before anything is read).
Only the checkpoint's config is read: the model is built on the meta device, so no weight is
loaded or downloaded and a 70B model is inspected in seconds. Printed: the architecture table (or
the generic fallback, with what it could not place), each component with its block stacks, Linear
count and parameter count; and, when the plan quantizes (``method`` other than fp16), every tensor
it would quantize with its role, shape, bits and grid, the AWQ folds it would use, and the bits per
weight per component including the fp16 scale/zero overhead.

JSON output (``--json``; stable, schema ``lmms-quant-inspect/1``; keys are never removed or renamed
within a schema version, new keys may be added)::

    {
      "schema": "lmms-quant-inspect/1",
      "model": {"id": str, "pretrained": str, "class": str, "family": str,
                "table": bool,              # true: an architecture table; false: the generic fallback
                "prompt_style": str},
      "components": {                       # "vit" | "connector" | "llm", those the model has
        "<component>": {"roots": [str], "parameters": int, "linears": int, "linear_parameters": int,
                        "stacks": [{"path": str, "blocks": int, "linears_per_block": int}],
                        "projections": [str],   # non-block Linears of the component
                        "heads": [str]}},       # Linears quantized only with include=lm_head
      "other": {"parameters": int, "linears": [str]},   # outside every component (task heads)
      "unclassified": [str],                # fallback only: Linears it placed in no component
      "notes": [str],                       # weights inside a component the engine cannot quantize
      "plan": null | {"model_args": {str: str}, "digest": str, "method": str},
      "targets": [{"name": str, "component": str, "role": str, "stack": str | null, "block": int | null,
                   "shape": [int, int], "parameters": int, "bits": int, "granularity": str,
                   "group_size": int, "sym": bool, "feeds_output": bool}],
      "folds": [{"prev": str, "linears": [str]}],          # AWQ only: scales folded exactly
      "dropped_folds": [str],                               # AWQ only: folds not exact for this config
      "sizes": {"<component>" | "other" | "total": {"params": int, "quantized_params": int,
                "bits_per_weight": float, "size_bytes": int}}   # as the plan would leave the model
    }
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def parse_args(model_id: str, model_args: str):
    """(wrapper class, wrapper args, recipe) as the wrapper ``model_id`` validates ``model_args``
    (nothing is loaded): the one place that parses a recipe here."""
    from lmms_eval.utils import simple_parse_args_string

    from lmms_quant.model_ids import MODEL_CLASSES, model_class

    if model_id not in MODEL_CLASSES:
        raise ValueError(f"--model: got {model_id!r}; valid: {', '.join(sorted(MODEL_CLASSES))}")
    wrapper = model_class(model_id)
    args, _, recipe = wrapper.validate_model_args(simple_parse_args_string(model_args or ""))
    return wrapper, args, recipe


def load_model(wrapper, args):
    """The model's modules, built from its config on the meta device (no weights read).

    The transformers class is the wrapper's (model_ids.py), else AutoModelForImageTextToText."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.pretrained, trust_remote_code=args.trust_remote_code)
    # The dtype the wrapper would load in ("auto": the checkpoint's): it sizes the unquantized weights.
    dtype = args.dtype if args.dtype != "auto" else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model_class = getattr(wrapper, "model_class", None) or transformers.AutoModelForImageTextToText
    with torch.device("meta"):
        if hasattr(model_class, "_from_config"):  # a concrete class
            model = model_class._from_config(config, dtype=dtype)
        else:  # an Auto class
            model = model_class.from_config(config, trust_remote_code=args.trust_remote_code, dtype=dtype)
    return model.eval()


def _component_summary(model, arch) -> tuple[dict, dict]:
    params: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        params[arch.component_of(name)] += param.numel()
    components = {}
    for comp in ("vit", "connector", "llm"):
        units = [u for u in arch.units if u.component == comp]
        if comp not in arch.family.roots and not units:
            continue
        sites = [s for u in units for s in u.linears]
        stacks: dict[str, list] = {}
        for u in units:
            if u.stack is not None:
                stacks.setdefault(u.stack, []).append(len(u.linears))
        components[comp] = {
            "roots": list(arch.family.roots.get(comp, ())),
            "parameters": params.get(comp, 0),
            "linears": len(sites),
            "linear_parameters": sum(s.module.weight.numel() for s in sites),
            "stacks": [{"path": p, "blocks": len(n), "linears_per_block": max(n)} for p, n in stacks.items()],
            "projections": [s.name for u in units if u.stack is None and u.include is None for s in u.linears],
            "heads": [s.name for u in units if u.include is not None for s in u.linears],
        }
    covered = {s.name for u in arch.units for s in u.linears}
    import torch

    other_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in covered]
    return components, {"parameters": params.get("other", 0), "linears": other_linears}


def inspect_model(model, arch, recipe, *, model_id: str = "", pretrained: str = "") -> dict:
    """The JSON document of the module docstring, for a built model, its resolved Arch and a Recipe."""
    from lmms_quant.quant.archs import select, stored_weight
    from lmms_quant.quant.report import account

    components, other = _component_summary(model, arch)
    doc = {
        "schema": "lmms-quant-inspect/1",
        "model": {"id": model_id, "pretrained": pretrained, "class": type(model).__name__,
                  "family": arch.family.name, "table": arch.family.strict, "prompt_style": arch.family.prompt_style},
        "components": components, "other": other,
        "unclassified": list(arch.family.unclassified), "notes": list(arch.family.notes),
        "plan": None, "targets": [], "folds": [], "dropped_folds": [],
    }
    grids = {}
    if not recipe.is_noop:
        units = select(arch, recipe, model)
        doc["plan"] = {"model_args": recipe.to_model_args(), "digest": recipe.digest(), "method": recipe.method}
        for unit in units:
            for t in unit.targets:
                weight = t.module.weight
                grids[id(stored_weight(t.module))] = (t.grid, tuple(weight.shape))
                doc["targets"].append({
                    "name": t.name, "component": t.site.component, "role": t.site.role, "stack": t.site.stack,
                    "block": t.site.block, "shape": list(weight.shape), "parameters": weight.numel(),
                    "bits": t.grid.bits, "granularity": t.grid.granularity, "group_size": t.grid.group_size,
                    "sym": t.grid.sym, "feeds_output": t.site.feeds_output})
            if recipe.method == "awq":
                doc["folds"] += [{"prev": f.prev_name, "linears": list(f.linears)} for f in unit.folds]
                doc["dropped_folds"] += list(unit.site.dropped_folds)
    doc["sizes"] = {k: v.to_dict() for k, v in account(model, arch.component_of, grids).items()}
    return doc


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_text(doc: dict) -> str:
    m = doc["model"]
    kind = "architecture table" if m["table"] else "generic fallback (no table: roles guessed, no AWQ folds)"
    lines = [f"{m['id']}  {m['pretrained']}", f"class {m['class']}  family {m['family']}  ({kind})", ""]
    lines.append(f"{'component':<10} {'parameters':>11} {'Linears':>8} {'in Linears':>11}")
    for comp, c in doc["components"].items():
        lines.append(f"{comp:<10} {_count(c['parameters']):>11} {c['linears']:>8} {_count(c['linear_parameters']):>11}")
        for s in c["stacks"]:
            lines.append(f"    {s['path']}: {s['blocks']} blocks x {s['linears_per_block']} Linears")
        for p in c["projections"]:
            lines.append(f"    {p}")
        for h in c["heads"]:
            lines.append(f"    {h}  (head: only with include=lm_head)")
    if doc["other"]["parameters"] or doc["other"]["linears"]:
        lines.append(f"{'other':<10} {_count(doc['other']['parameters']):>11} {len(doc['other']['linears']):>8}"
                     f"  in no component, never quantized: {', '.join(doc['other']['linears']) or '-'}")
    for name in doc["unclassified"]:
        lines.append(f"UNCLASSIFIED: {name} (the fallback placed it in no component; left in floating point)")
    for note in doc["notes"]:
        lines.append(f"note: {note}")
    if doc["plan"] is None:
        lines += ["", "method=fp16: this plan quantizes nothing (add method=rtn|gptq|awq to see its targets)"]
        return "\n".join(lines)
    plan = doc["plan"]
    args = " ".join(f"{k}={v}" for k, v in plan["model_args"].items())
    n_params = sum(t["parameters"] for t in doc["targets"])
    lines += ["", f"plan {plan['digest']}: {args}",
              f"would quantize {len(doc['targets'])} tensors ({_count(n_params)} parameters):"]
    width = max(len(t["name"]) for t in doc["targets"])
    for t in doc["targets"]:
        grid = {"tensor": "per-tensor", "channel": "per-channel"}.get(t["granularity"], f"group {t['group_size']}")
        unused = "  (output never read)" if not t["feeds_output"] else ""
        lines.append(f"  {t['name']:<{width}}  {t['component']:<9} {t['role']:<14} {'x'.join(map(str, t['shape'])):>11}"
                     f"  {t['bits']}-bit {grid} {'sym' if t['sym'] else 'asym'}{unused}")
    if plan["method"] == "awq":
        lines.append(f"AWQ folds ({len(doc['folds'])}, exact):")
        lines += [f"  {f['prev']} -> {', '.join(f['linears'])}" for f in doc["folds"]]
        lines += [f"  not folded: {d}" for d in doc["dropped_folds"]]
    lines.append("bits per weight (fp16 scales/zeros included): " + ", ".join(
        f"{k} {v['bits_per_weight']:.2f}" for k, v in doc["sizes"].items() if v["params"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lmms-quant inspect", description=(
        "Show a model's components, block stacks, Linear and parameter counts and, for a plan, the exact "
        "tensors it would quantize and at what bits. Reads only the config: no weights, no calibration."))
    parser.add_argument("--model", required=True, help="an lmms-quant wrapper id (quant_blip2, quant_llava, ...)")
    parser.add_argument("--model_args", required=True, help="pretrained=...,method=...,bits=...: as for lmms-eval")
    parser.add_argument("--json", action="store_true", help="print the JSON document (schema in the module docstring)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from lmms_quant.quant import ArchitectureError
    from lmms_quant.quant.archs import resolve

    try:
        wrapper, wargs, recipe = parse_args(args.model, args.model_args)
        model = load_model(wrapper, wargs)
        doc = inspect_model(model, resolve(model), recipe, model_id=args.model, pretrained=wargs.pretrained)
    except (ArchitectureError, ValueError) as err:  # RecipeError is a ValueError
        print(f"lmms-quant inspect: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lmms-quant inspect: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else render_text(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
