"""The quantization report: what was quantized, how well, and what the model now weighs.

Per quantized tensor: name, component, stack/block, role, method, bits, grid, the largest number of
distinct levels in any cell, relative weight error, relative output error on held-out calibration
batches (and on the calibration batches themselves, next to plain RTN's for GPTQ/AWQ).

Sizes are computed from the model itself, per component and in total, over every parameter
(tied parameters once): a quantized weight costs ``bits`` per weight plus an fp16 scale per cell
and, for an asymmetric grid, a ``bits``-wide zero-point per cell. Every other parameter is counted
at the stated baseline, ``BPW_BASELINE`` = 16 bits (as the paper counts: an fp32 checkpoint is not
"32 bpw" of vision tower), and, beside it, at its stored dtype (``stored_bits_per_weight``,
``stored_size_bytes``: what this checkpoint in memory really takes). Buffers are not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lmms_quant.atomic import write_json_atomic

from .quantizer import QuantGrid, QuantizedWeight

BPW_BASELINE = 16  # bits per unquantized weight, whatever the checkpoint's dtype


@dataclass
class TensorRecord:
    name: str
    component: str
    stack: str | None
    block: int | None
    role: str
    method: str
    bits: int
    granularity: str
    group_size: int
    sym: bool
    shape: tuple[int, int]
    n_groups: int
    max_levels: int
    weight_error: float
    output_error: float | None  # held-out calibration batches
    output_error_calib: float | None
    rtn_output_error_calib: float | None
    feeds_output: bool = True
    tied_to: list[str] = field(default_factory=list)
    holdout_tokens: int = 0
    details: dict = field(default_factory=dict)


@dataclass
class SizeRecord:
    params: int = 0
    quantized_params: int = 0
    bits: int = 0  # unquantized parameters at BPW_BASELINE
    stored_bits: int = 0  # unquantized parameters at their stored dtype

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params if self.params else float("nan")

    @property
    def size_bytes(self) -> int:
        return math.ceil(self.bits / 8)

    def to_dict(self) -> dict:
        return {"params": self.params, "quantized_params": self.quantized_params,
                "bits_per_weight": self.bits_per_weight, "bpw_baseline": BPW_BASELINE, "size_bytes": self.size_bytes,
                "stored_bits_per_weight": self.stored_bits / self.params if self.params else float("nan"),
                "stored_size_bytes": math.ceil(self.stored_bits / 8)}

    @classmethod
    def from_dict(cls, data: dict) -> "SizeRecord":
        params = int(data["params"])
        stored = data.get("stored_bits_per_weight", data["bits_per_weight"])
        return cls(params, int(data["quantized_params"]), round((data["bits_per_weight"] or 0) * params),
                   round((stored or 0) * params))


def account(model, component_of, quantized_grids: dict[int, tuple[QuantGrid, tuple[int, int]]]) -> dict[str, SizeRecord]:
    """Sizes per component (and "total") given, by parameter id, the grid of each quantized weight and
    its (out_features, in_features) as quantized (a matmul weight is stored transposed: `MatmulView`)."""
    sizes: dict[str, SizeRecord] = {}
    total = SizeRecord()
    for name, param in model.named_parameters():
        record = sizes.setdefault(component_of(name), SizeRecord())
        n = param.numel()
        grid, shape = quantized_grids.get(id(param), (None, None))
        if grid is not None:
            bits = stored = grid.storage_bits(*shape)
            record.quantized_params += n
            total.quantized_params += n
        else:
            bits, stored = n * BPW_BASELINE, n * param.element_size() * 8
        for r in (record, total):
            r.params += n
            r.bits += bits
            r.stored_bits += stored
    sizes["total"] = total
    return sizes


def _clean(value):
    """JSON-safe: NaN/inf become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class QuantReport:
    """Everything one `quantize_model` run did. ``codes`` (not serialised) holds the integer codes,
    scales and zeros per tensor when requested, for packed export."""

    def __init__(self, *, plan: dict, digest: str, model: dict, calibration: dict | None,
                 tensors: list[TensorRecord], sizes: dict[str, SizeRecord], skipped: list[dict],
                 folds: list[dict], notes: list[str], timing: dict, environment: dict,
                 codes: dict[str, QuantizedWeight] | None = None):
        self.plan = plan
        self.digest = digest
        self.model = model
        self.calibration = calibration
        self.tensors = tensors
        self.sizes = sizes
        self.skipped = skipped
        self.folds = folds
        self.notes = notes
        self.timing = timing
        self.environment = environment
        self.codes = codes or {}
        self.weight_cache: dict | None = None  # {"key", "hit"} when it came through the weight cache
        self.extra: dict = {}  # further top-level fields of a stored report, kept as they were

    @property
    def components(self) -> dict[str, SizeRecord]:
        return {k: v for k, v in self.sizes.items() if k != "total"}

    @property
    def total(self) -> SizeRecord:
        return self.sizes["total"]

    def tensor(self, name: str) -> TensorRecord:
        for record in self.tensors:
            if record.name == name:
                return record
        raise KeyError(f"{name!r} was not quantized in this run")

    def to_dict(self) -> dict:
        data = _clean({
            "plan": self.plan,
            "plan_digest": self.digest,
            "model": self.model,
            "calibration": self.calibration,
            "components": {k: v.to_dict() for k, v in self.components.items()},
            "total": self.total.to_dict(),
            "n_quantized_tensors": len(self.tensors),
            "tensors": [asdict(t) for t in self.tensors],
            "skipped": self.skipped,
            "awq_folds": self.folds,
            "notes": self.notes,
            "timing": self.timing,
            "environment": self.environment,
        })
        data.update(self.extra)
        if self.weight_cache is not None:
            data["weight_cache"] = self.weight_cache
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "QuantReport":
        """A report as `to_dict` wrote it (the weight cache stores reports so)."""
        sizes = {name: SizeRecord.from_dict(d) for name, d in data.get("components", {}).items()}
        sizes["total"] = SizeRecord.from_dict(data["total"])
        tensors = [TensorRecord(**{**t, "shape": tuple(t["shape"])}) for t in data.get("tensors", [])]
        report = cls(plan=data["plan"], digest=data["plan_digest"], model=data["model"],
                     calibration=data.get("calibration"), tensors=tensors, sizes=sizes,
                     skipped=data.get("skipped", []), folds=data.get("awq_folds", []), notes=data.get("notes", []),
                     timing=data.get("timing", {}), environment=data.get("environment", {}))
        known = {"plan", "plan_digest", "model", "calibration", "components", "total", "n_quantized_tensors",
                 "tensors", "skipped", "awq_folds", "notes", "timing", "environment", "weight_cache"}
        report.extra = {k: v for k, v in data.items() if k not in known}
        return report

    def write_json(self, path) -> None:
        """Write atomically: a temp file in the same directory, then rename."""
        write_json_atomic(path, self.to_dict(), sort_keys=False)

    def summary(self) -> str:
        lines = [f"lmms-quant {self.plan.get('method')} ({self.digest}): {len(self.tensors)} tensors quantized"]
        for comp, size in self.components.items():
            lines.append(f"  {comp:<10} params {size.params:>13,}  quantized {size.quantized_params:>13,}  "
                         f"{size.bits_per_weight:6.3f} bpw  {size.size_bytes:>13,} B")
        total = self.total
        lines.append(f"  {'total':<10} params {total.params:>13,}  quantized {total.quantized_params:>13,}  "
                     f"{total.bits_per_weight:6.3f} bpw  {total.size_bytes:>13,} B")
        errors = [t.output_error for t in self.tensors if t.output_error is not None]
        if errors:
            lines.append(f"  held-out relative output error: mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}")
        if self.skipped:
            lines.append(f"  SKIPPED {len(self.skipped)}: " + "; ".join(f"{s['name']} ({s['reason']})" for s in self.skipped))
        return "\n".join(lines)
