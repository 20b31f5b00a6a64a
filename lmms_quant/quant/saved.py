"""A saved quantized run (``lmms-quant quantize --save DIR``): written and read back in one place.

DIR holds
- the simulated model and its processor (``from_pretrained``-loadable; quantized Linears hold the
  dequantized weights in the model dtype),
- ``quant_codes.safetensors``: per quantized Linear ``<name>.codes`` (uint8, out x in),
  ``<name>.scale`` (fp32, the scales the simulation used, bit for bit) and, for an asymmetric grid,
  ``<name>.zero`` (uint8); the grid of each tensor in the file's metadata. A matmul weight (Gemma 3's
  ``mm_input_projection_weight``) is named by its own key; its codes are in the orientation of the
  Linear it computes (the transpose of the stored tensor), marked ``stored=transposed`` there,
- ``quant_report.json``.

Names: every tensor name the project writes is the saved model's own ``state_dict`` key.
transformers v5 renames some keys on save (LLaVA's in-memory ``model.language_model.layers.N`` is
``language_model.model.layers.N`` in the file): `checkpoint_names` runs the same reverse
conversion ``save_pretrained`` runs (``transformers.core_model_loading.revert_weight_conversion``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_quant.atomic import atomic_directory

from .quantizer import QuantGrid, QuantizedWeight

CODES_FILE = "quant_codes.safetensors"
REPORT_FILE = "quant_report.json"


class SavedRunError(ValueError):
    """A saved-run directory is missing a file or does not agree with itself."""


def checkpoint_names(model, module_names) -> dict[str, str]:
    """In-memory module name -> the module name its weight has in this model's ``save_pretrained``;
    a parameter's own name (a matmul weight, `archs.MatmulView`) -> its saved key."""
    from transformers.core_model_loading import revert_weight_conversion

    keys = list(model.state_dict().keys())
    # Each key carries its own index through transformers' renaming, so the mapping is read off exactly.
    renamed = revert_weight_conversion(model, {k: torch.tensor(i) for i, k in enumerate(keys)})
    back: dict[int, str] = {}
    for new_key, value in renamed.items():
        value = value[0] if isinstance(value, list) else value
        if value.numel() != 1:
            raise SavedRunError(f"{new_key}: transformers merges several weights into it on save; "
                                "packed names need a one-to-one renaming")
        back[int(value)] = new_key
    index = {k: i for i, k in enumerate(keys)}
    names = {}
    for name in module_names:
        if f"{name}.weight" not in index and name in index:  # a parameter named by itself
            key = back.get(index[name])
            if key is None:
                raise SavedRunError(f"{name}: not found among the model's saved weights")
            names[name] = key
            continue
        key = back.get(index.get(f"{name}.weight", -1))
        if key is None or not key.endswith(".weight"):
            raise SavedRunError(f"{name}.weight: not found among the model's saved weights")
        names[name] = key.removesuffix(".weight")
    return names


# Metadata suffix of codes whose tensor the model stores transposed (a matmul weight: the codes are
# in the orientation of the Linear it computes, (out_features, in_features), as every grid is).
TRANSPOSED = ",stored=transposed"


def _stored(model, name: str) -> torch.Tensor:
    """The quantized weight of ``name`` in Linear orientation: a Linear's weight, or a parameter's transpose."""
    try:
        return model.get_submodule(name).weight.detach()
    except AttributeError:
        return model.get_parameter(name).detach().T


def _grid_text(grid: QuantGrid) -> str:
    return f"bits={grid.bits},sym={grid.sym},granularity={grid.granularity},group_size={grid.group_size}"


def _grid_from_text(key: str, text: str) -> QuantGrid:
    try:
        fields = dict(item.split("=", 1) for item in text.split(","))
        return QuantGrid(bits=int(fields["bits"]), sym=fields["sym"] == "True", granularity=fields["granularity"],
                         group_size=int(fields["group_size"]))
    except (KeyError, ValueError) as err:
        raise SavedRunError(f"{CODES_FILE}: metadata for {key!r} is {text!r} ({err}); "
                            "valid: bits=..,sym=..,granularity=..,group_size=..") from None


def write_saved_run(model, processor, report, out_dir) -> Path:
    """Model + processor, integer codes and report into a new directory, renamed into place whole."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        names = checkpoint_names(model, report.codes)
        tensors, metadata = {}, {}
        for name, q in report.codes.items():
            key = names[name]
            tensors[f"{key}.codes"] = q.codes.to(torch.uint8).contiguous()
            tensors[f"{key}.scale"] = q.scale.float().contiguous()
            if not q.grid.sym:
                tensors[f"{key}.zero"] = q.zero.to(torch.uint8).contiguous()
            transposed = not isinstance(_module_or_none(model, name), torch.nn.Linear)
            metadata[key] = _grid_text(q.grid) + (TRANSPOSED if transposed else "")
        if tensors:
            save_file(tensors, str(tmp / CODES_FILE), metadata=metadata)
        report.write_json(tmp / REPORT_FILE)
    return out_dir


@dataclass
class SavedRun:
    model: object
    processor: object
    report: dict  # quant_report.json as written
    codes: dict[str, QuantizedWeight]  # by in-memory module name


def read_saved_run(saved_dir, *, device=None) -> SavedRun:
    """Load a saved run: the model (its dtype as saved), processor, report and codes.

    Checks that the saved model's quantized weights are exactly the codes dequantized (and cast to
    the model dtype), so nothing downstream can pack codes that are not the model that was scored."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoProcessor

    saved_dir = Path(saved_dir)
    for needed in ("config.json", CODES_FILE, REPORT_FILE):
        if not (saved_dir / needed).is_file():
            raise SavedRunError(f"{str(saved_dir)!r} is not a saved run: {needed} is missing "
                                "(write one with `lmms-quant quantize ... --save DIR`)")
    report = json.loads((saved_dir / REPORT_FILE).read_text())
    class_name = (report.get("model") or {}).get("class")
    model_class = getattr(transformers, str(class_name), None)
    if model_class is None:
        raise SavedRunError(f"{REPORT_FILE}: model.class={class_name!r} is not a transformers model class")
    model = model_class.from_pretrained(str(saved_dir), dtype="auto").eval()
    if device is not None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(str(saved_dir))

    with safe_open(str(saved_dir / CODES_FILE), framework="pt") as handle:
        metadata = handle.metadata() or {}
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    in_memory = {saved: name for name, saved in checkpoint_names(model, _linear_names(model)).items()}
    in_memory_params = _matmul_names(model) if any(text.endswith(TRANSPOSED) for text in metadata.values()) else {}
    codes = {}
    for key, text in metadata.items():
        transposed = text.endswith(TRANSPOSED)
        name = (in_memory_params if transposed else in_memory).get(key)
        if name is None:
            raise SavedRunError(f"{CODES_FILE}: {key!r} names no {'parameter' if transposed else 'Linear'} of the "
                                "saved model")
        grid = _grid_from_text(key, text.removesuffix(TRANSPOSED))
        q_codes, scale = stored[f"{key}.codes"], stored[f"{key}.scale"].float()
        zero = (stored[f"{key}.zero"].to(torch.int32) if not grid.sym
                else torch.full(scale.shape, 2 ** (grid.bits - 1), dtype=torch.int32))
        in_features = q_codes.shape[1]
        # The same fp32 operations as quantize_with_params: the same bits as the simulated weight.
        weight = grid.dequantize(q_codes.float(), grid.expand(scale, in_features), grid.expand(zero.float(), in_features))
        stored_weight = _stored(model, name)
        if not torch.equal(weight.to(stored_weight.dtype).to(stored_weight.device), stored_weight):
            raise SavedRunError(f"{name}: the saved weight is not its codes dequantized; the run directory "
                                "is inconsistent (edited, or written by another version)")
        codes[name] = QuantizedWeight(weight=weight, codes=q_codes, scale=scale, zero=zero, grid=grid)
    return SavedRun(model=model, processor=processor, report=report, codes=codes)


def _matmul_names(model) -> dict[str, str]:
    """Saved key -> in-memory name of every 2-d parameter outside the Linears (a matmul weight's codes
    are named by it); one by one, so that a parameter save_pretrained drops (tied) is just absent."""
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    names = {}
    for name, param in model.named_parameters():
        if param.dim() == 2 and id(param) not in linears:
            try:
                names[checkpoint_names(model, [name])[name]] = name
            except SavedRunError:
                continue
    return names


def _module_or_none(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
