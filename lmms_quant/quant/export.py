"""Packed export: a quantized run as a compressed-tensors ``pack-quantized`` checkpoint.

    lmms-quant quantize --model quant_llava --model_args ... --report r.json --export DIR
    lmms-quant export SAVED_DIR DIR          # from a `lmms-quant quantize --save SAVED_DIR` run

The checkpoint is what llm-compressor writes and vLLM serves: ``config.json`` carries a
``quantization_config`` with one config group per distinct weight scheme (bits, symmetry,
strategy, group size, act-order) whose ``targets`` name exactly the quantized Linears, an
``ignore`` list of every other Linear, and the safetensors hold ``weight_packed`` (int32),
``weight_scale`` (fp32), ``weight_zero_point`` (int32, packed; asymmetric only) and
``weight_shape`` per quantized Linear. The writing is compressed-tensors' own
(``apply_quantization_config``, ``compress_module``, ``ModelCompressor.update_config``) plus
transformers' ``save_pretrained``; nothing here packs bits.

Our grid and theirs (quantizer.py; compressed_tensors.quantization.lifecycle.forward):
- ours: codes c in [0, 2^b-1], integer zero z in [0, 2^b-1] (symmetric: z = 2^(b-1), not stored),
  w = (c - z) * s in fp32;
- theirs: signed q in [-2^(b-1), 2^(b-1)-1], signed zero-point zp (asymmetric only),
  w = (q - zp) * s in the scale's dtype (``_dequantize``: x_q.to(s.dtype) - zp.to(s.dtype), then * s).
So q = c - 2^(b-1), zp = z - 2^(b-1), and (q - zp) = (c - z) exactly (small integers in fp32); the
scales are stored fp32, as the simulation used them, so decompression gives the simulated fp32
weight bit for bit, checked for every tensor before anything is written. Stored in the model dtype
they would not be: a runtime that casts the scales to fp16/bf16 (vLLM creates ``weight_scale`` in
the model dtype) rounds them, and its weights differ from the simulated ones by that rounding.

A quantized matmul weight (Gemma 3's ``mm_input_projection_weight``: a parameter, not an nn.Linear,
`archs.MatmulView`) has no module to pack: it is written dense in the model dtype, holding exactly
its dequantized codes (checked), and listed in the export record's ``dense_quantized`` and notes.

Refused, with the reason: a group width that does not divide in_features (compressed-tensors'
group strategy has no narrow last group), a quantized weight tied to another parameter (packing
removes the dense weight the other one shares), and a model whose weights are not its codes.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_quant.atomic import atomic_directory, write_json_atomic

from .quantizer import QuantizedWeight
from .saved import REPORT_FILE, checkpoint_names

FORMAT = "compressed-tensors"
PACKED = "pack-quantized"
STRATEGY = {"tensor": "tensor", "channel": "channel", "group": "group"}


class ExportError(ValueError):
    """The run cannot be written as a compressed-tensors checkpoint; the message says why."""


def require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError("compressed-tensors is not installed; valid: pip install 'lmms-quant[export]'") from None


def check_new_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"export directory {str(out_dir)!r} exists and is not empty; refusing to overwrite it")
    return out_dir


def recipe_act_order(recipe_args: dict) -> bool:
    """Whether GPTQ ran with act-order: the one place export reads the recipe. Only the keys that decide
    it are parsed (a saved run's local calibration file need not exist where it is exported)."""
    from .recipe import Recipe

    keys = {k: recipe_args[k] for k in ("method", "act_order") if k in recipe_args}
    return bool(getattr(Recipe.parse(keys).config, "act_order", False))


@dataclass(frozen=True)
class WeightScheme:
    bits: int
    sym: bool
    strategy: str  # tensor | channel | group
    group_size: int | None
    actorder: str | None  # "weight": GPTQ's static groups in act-order (no g_idx)

    def args(self):
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.sym, strategy=self.strategy,
                                group_size=self.group_size, actorder=self.actorder)


def weight_schemes(model, codes: dict[str, QuantizedWeight], act_order: bool) -> dict[str, WeightScheme]:
    """Each quantized Linear's scheme; every tensor the format cannot hold exactly is named in one error."""
    if not codes:
        raise ExportError("nothing to export: the run quantized no tensor (method=fp16?)")
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    problems, schemes = [], {}
    for name, q in sorted(codes.items()):
        grid = q.grid
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        if not isinstance(module, torch.nn.Linear):
            problems.append(f"{name}: a {type(module).__name__}, not a Linear")
            continue
        weight = module.weight.detach()
        out_features, in_features = weight.shape
        others = [n for n in shared.get(id(module.weight), []) if n != f"{name}.weight"]
        if others:
            problems.append(f"{name}.weight is tied to {', '.join(others)}: a packed Linear stores no dense "
                            "weight, so the tied parameter would lose its values (leave it unquantized)")
        if grid.granularity == "group" and in_features % grid.group_size:
            problems.append(f"{name}: group_size={grid.group_size} does not divide in_features={in_features} "
                            f"(the last group of each row is {in_features % grid.group_size} wide); compressed-"
                            "tensors' group strategy needs equal groups; valid: a group_size dividing it, or -1")
        if tuple(q.codes.shape) != (out_features, in_features):
            problems.append(f"{name}: codes are {tuple(q.codes.shape)}, the weight is {(out_features, in_features)}")
        elif not torch.equal(q.weight.to(weight.dtype).to(weight.device), weight):
            problems.append(f"{name}: the model's weight is not its codes dequantized (changed after quantization?)")
        schemes[name] = WeightScheme(
            bits=grid.bits, sym=grid.sym, strategy=STRATEGY[grid.granularity],
            group_size=grid.group_size if grid.granularity == "group" else None,
            actorder="weight" if act_order else None)
    if problems:
        raise ExportError(f"cannot write a {FORMAT} checkpoint:\n  " + "\n  ".join(problems))
    return schemes


def their_scale_zero(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our (scale, zero) in compressed-tensors' convention: fp32 scales, signed int8 zero-points."""
    offset = 2 ** (q.grid.bits - 1)
    scale, zero = q.scale.float(), q.zero.to(torch.int32)
    if q.grid.granularity == "tensor":  # their per-tensor parameters are shaped (1,)
        scale, zero = scale.reshape(1), zero.reshape(1)
    return scale.contiguous(), None if q.grid.sym else (zero - offset).to(torch.int8).contiguous()


def _target(in_memory: str, saved: str) -> str:
    """The module by full name; where transformers renames it on save, a regex for both names:
    transformers matches targets against in-memory names, vLLM against checkpoint names."""
    if in_memory == saved:
        return in_memory
    return "re:^(?:" + "|".join(name.replace(".", r"\.") for name in (saved, in_memory)) + ")$"


def pack_model(model, codes: dict[str, QuantizedWeight], act_order: bool):
    """Turn the quantized Linears of ``model`` into compressed-tensors packed modules (in place: the
    model can be saved, not run, afterwards); returns the QuantizationConfig for config.json."""
    require_compressed_tensors()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)

    schemes = weight_schemes(model, codes, act_order)  # before any change to the model
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    saved = checkpoint_names(model, linears)
    by_scheme: dict[WeightScheme, list[str]] = {}
    for name, scheme in schemes.items():
        by_scheme.setdefault(scheme, []).append(name)
    groups = {f"group_{i}": QuantizationScheme(targets=[_target(n, saved[n]) for n in names], weights=scheme.args(),
                                               format=PACKED)
              for i, (scheme, names) in enumerate(by_scheme.items())}
    config = QuantizationConfig(config_groups=groups, ignore=[], quantization_status=QuantizationStatus.FROZEN,
                                format=PACKED)
    quiet = {"show_progress": False} if "show_progress" in inspect.signature(apply_quantization_config).parameters else {}
    apply_quantization_config(model, config, **quiet)
    matched = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if matched != set(schemes):
        raise ExportError(f"the config groups' targets match {sorted(matched ^ set(schemes))[:5]} wrongly")

    compressor = BaseCompressor.get_value_from_registry(PACKED)
    for name, q in codes.items():
        module = model.get_submodule(name)
        scale, zero = their_scale_zero(q)
        device = module.weight.device
        # The library packs by re-quantizing weight/scale + zp; from the exact fp32 weight that
        # recovers our integers (|(c - z) s / s - (c - z)| is far below 1/2).
        module.weight = torch.nn.Parameter(q.weight.float().to(device), requires_grad=False)
        module.weight_scale = torch.nn.Parameter(scale.to(device), requires_grad=False)
        if zero is None:
            if hasattr(module, "weight_zero_point"):
                del module.weight_zero_point
        else:
            module.weight_zero_point = torch.nn.Parameter(zero.to(device), requires_grad=False)
        compress_module(module, PACKED)
        packed = {k: getattr(module, k) for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                  if hasattr(module, k)}
        back = compressor.decompress(packed, module.quantization_scheme)["weight"]
        if not torch.equal(back.float().cpu(), q.weight.float().cpu()):
            raise ExportError(f"{name}: compressed-tensors' decompression does not give the simulated weight back "
                              f"(max |diff| {float((back.float().cpu() - q.weight.float().cpu()).abs().max()):.3g})")
    config.quantization_status = QuantizationStatus.COMPRESSED
    config.ignore = sorted(saved[n] for n in linears if n not in schemes)
    return config


def load_exported(export_dir, *, dtype="auto", device_map=None):
    """The exported checkpoint through transformers' compressed-tensors quantizer, dequantized.

    One config group: ``CompressedTensorsConfig(dequantize=True)``, which decompresses the checkpoint
    tensors themselves (fp32 scales) - bit for bit the simulated weights. Several groups: transformers
    (<= 5.24) dequantizes every module with the first group's scheme (``get_dense_scheme``), so the
    model is loaded compressed and each module decompressed by its own scheme; that path creates the
    scales in the model dtype (exact only in fp32) and cannot load asymmetric packed zero-points
    (compressed-tensors 0.20.1 shapes them unpacked)."""
    import transformers
    from transformers import CompressedTensorsConfig

    config = json.loads((Path(export_dir) / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    load = {"dtype": dtype}
    if device_map is not None:
        load["device_map"] = device_map
    if len(config["quantization_config"]["config_groups"]) == 1:
        return model_class.from_pretrained(str(export_dir), quantization_config=CompressedTensorsConfig(dequantize=True),
                                           **load).eval()
    model = model_class.from_pretrained(str(export_dir), **load).eval()
    model.hf_quantizer.compressor.decompress_model(model)
    for module in model.modules():  # as the dequantizing path leaves them: plain weights, no qparams
        if getattr(module, "quantization_scheme", None) is not None:
            for key in ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"):
                if key in module._parameters or key in module._buffers:
                    delattr(module, key)
    return model


def loaded_memory(export_dir, model_class, device) -> tuple[int | None, str | None]:
    """GPU bytes held after ``from_pretrained`` with the weights kept packed (before any forward),
    or (None, why)."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    try:
        model = model_class.from_pretrained(str(export_dir), device_map={"": str(device)})
    except Exception as err:  # a loader limitation must not cost the export: record why instead
        return None, f"transformers could not load it compressed on {device}: {type(err).__name__}: {err}"[:500]
    torch.cuda.synchronize(device)
    used = torch.cuda.memory_allocated(device) - before
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return int(used), None


def export_checkpoint(model, processor, report: dict, codes: dict[str, QuantizedWeight], out_dir, *,
                      act_order: bool, measure_on=None) -> dict:
    """Write the checkpoint (model + processor + quantization report) to the new directory ``out_dir``.

    ``model`` is consumed (its quantized Linears become packed). ``measure_on``: a CUDA device to
    measure the loaded memory on. Returns ``report`` with its ``"export"`` record added."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor

    out_dir = check_new_dir(out_dir)
    model_class = getattr(transformers, type(model).__name__)
    dense = dense_matmul_weights(model, codes)
    codes = {name: q for name, q in codes.items() if name not in dense}
    if dense and not codes:
        raise ExportError(f"nothing to pack: the run quantized only {', '.join(dense)}, a matmul weight that "
                          f"{FORMAT} cannot pack (no nn.Linear); valid: a run that quantizes Linears too")
    notes = []
    if dense:
        notes.append(f"export: {', '.join(sorted(dense))}: a matmul weight, not an nn.Linear, so compressed-tensors "
                     "cannot pack it; written dense in the model dtype, holding its quantized values")
    if any(q.grid.granularity == "tensor" for q in codes.values()):
        notes.append("export: per-tensor weight scales are written as compressed-tensors strategy=tensor; vLLM's "
                     "WNA16 scheme serves only channel and group strategies")
    with atomic_directory(out_dir) as tmp:
        config = pack_model(model, codes, act_order)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        ModelCompressor(quantization_config=config).update_config(str(tmp))
        memory, why, device = None, None, "cpu"
        if measure_on is not None and torch.device(measure_on).type == "cuda":
            device = str(torch.device(measure_on))
            memory, why = loaded_memory(tmp, model_class, device)
            if why:
                notes.append(f"export: loaded_memory_bytes not measured: {why}")
        record = {"format": FORMAT, "dir": str(out_dir.resolve()),
                  "file_bytes": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
                  "loaded_memory_bytes": memory, "device": device, "dense_quantized": sorted(dense)}
        report = {**report, "notes": list(report.get("notes") or []) + notes, "export": record}
        write_json_atomic(tmp / REPORT_FILE, report, sort_keys=False)
    for note in notes:
        print(f"lmms-quant export: {note}", file=sys.stderr)
    return report


def dense_matmul_weights(model, codes: dict[str, QuantizedWeight]) -> list[str]:
    """The quantized matmul weights among ``codes`` (named by their parameter, `archs.MatmulView`):
    no module to pack, so they stay dense; each must already hold exactly its dequantized codes."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    dense, problems = [], []
    for name, q in sorted(codes.items()):
        if name in modules or name not in params:
            continue
        stored = params[name].detach().T  # codes are in the orientation of the Linear it computes
        if tuple(q.codes.shape) != tuple(stored.shape):
            problems.append(f"{name}: codes are {tuple(q.codes.shape)}, its transpose is {tuple(stored.shape)}")
        elif not torch.equal(q.weight.to(stored.dtype).to(stored.device), stored):
            problems.append(f"{name}: the model's weight is not its codes dequantized (changed after quantization?)")
        dense.append(name)
    if problems:
        raise ExportError(f"cannot write a {FORMAT} checkpoint:\n  " + "\n  ".join(problems))
    return dense


def export_run(model, processor, report, out_dir, *, device=None, report_path=None) -> dict:
    """`lmms-quant quantize --export`: the in-memory run (``quantize(..., keep_codes=True)``); ``report``
    gains the export record (and notes), and is rewritten to ``report_path`` if given."""
    data = export_checkpoint(model, processor, report.to_dict(), report.codes, out_dir,
                             act_order=recipe_act_order(report.plan), measure_on=device)
    report.notes = data["notes"]
    report.extra["export"] = data["export"]
    if report_path is not None:
        report.write_json(report_path)
    return data


def main(argv=None) -> int:
    """``lmms-quant export SAVED_DIR DIR``: the exit status."""
    parser = argparse.ArgumentParser(prog="lmms-quant export", description="Write a saved quantized run "
                                     f"(lmms-quant quantize --save) as a {FORMAT} {PACKED} checkpoint.")
    parser.add_argument("saved_dir", help="a directory written by `lmms-quant quantize ... --save`")
    parser.add_argument("out_dir", help="the new checkpoint directory")
    parser.add_argument("--device", default=None, help="where to pack and measure the loaded memory "
                        "(default: cuda if available, else cpu: no memory figure)")
    parser.add_argument("--report", default=None, help="also write the report (with its export record) here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from .saved import SavedRunError, read_saved_run

    try:
        check_new_dir(args.out_dir)
        require_compressed_tensors()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        run = read_saved_run(args.saved_dir, device=device)
        data = export_checkpoint(run.model, run.processor, run.report, run.codes, args.out_dir,
                                 act_order=recipe_act_order(run.report.get("plan") or {}), measure_on=device)
        if args.report:
            write_json_atomic(args.report, data, sort_keys=False)
    except (ExportError, SavedRunError) as err:
        print(f"lmms-quant export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lmms-quant export: error: {err}", file=sys.stderr)
        return 1
    record = data["export"]
    print(f"{FORMAT} checkpoint: {record['dir']} ({record['file_bytes']:,} B of weights"
          + (f"; {record['loaded_memory_bytes']:,} B loaded on {record['device']})" if record["loaded_memory_bytes"]
             is not None else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
