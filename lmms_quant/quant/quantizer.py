"""The integer grid every method quantizes onto, and what a quantized weight is.

W is (out_features, in_features). A *cell* is the set of weights that share one (scale, zero):
the whole tensor, one output row ("channel"), or ``group_size`` consecutive input columns of one
row ("group"; the last group of a row is narrower when ``group_size`` does not divide in_features).

Codes are unsigned, q in 0..2^b-1, and w_hat = (q - z) * s for both grids:

- asymmetric: min <= 0 <= max are stretched over codes 0..2^b-1, s = (max-min)/(2^b-1), integer
  zero-point z = round(-min/s) (clamped to 0..2^b-1); q = clamp(round(w/s) + z, 0, 2^b-1).
- symmetric: every one of the 2^b codes is used, as in the GPTQ reference (IST-DASLab ``quant.py``)
  and compressed-tensors (``calculate_qparams``: scale = max|w| / ((q_max - q_min)/2) with the signed
  int range q_min = -2^(b-1), q_max = 2^(b-1)-1): s = 2·max|w| / (2^b-1), z = 2^(b-1) fixed (not
  stored), q = clamp(round(w/s) + 2^(b-1), 0, 2^b-1). The signed code of a packed symmetric export
  (compressed-tensors: zero-point 0) is exactly q - 2^(b-1) = clamp(round(w/s), -2^(b-1), 2^(b-1)-1),
  with the same s. Levels run from -2^(b-1)·s to (2^(b-1)-1)·s; ±max|w| fall half-way between the
  two outermost levels on their side (w/s = ±(2^(b-1) - 1/2)), as in both references.
- a narrow last group (group_size not dividing in_features) takes its range from its own columns.

Scales stay fp32 during simulation; the size accounting (report.py) charges them as fp16, the format
a packed export stores (the difference is below fp16 resolution of the scale).
Biases are never quantized.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantGrid:
    bits: int
    sym: bool
    granularity: str  # "tensor" | "channel" | "group"
    group_size: int = -1  # only for granularity == "group"

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits: got {self.bits!r}; valid: 2..8")
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity: got {self.granularity!r}; valid: tensor, channel, group")
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError(f"group_size: got {self.group_size!r}; valid: a positive int for granularity=group")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        """Cells per row (1 for tensor and channel)."""
        return math.ceil(in_features / self.group_size) if self.granularity == "group" else 1

    def param_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        rows = 1 if self.granularity == "tensor" else out_features
        return rows, self.n_groups(in_features)

    def n_cells(self, out_features: int, in_features: int) -> int:
        rows, cols = self.param_shape(out_features, in_features)
        return rows * cols

    def column_group(self, in_features: int, device=None) -> torch.Tensor:
        """For every input column, the index of its cell column."""
        cols = torch.arange(in_features, device=device)
        if self.granularity == "group":
            return cols // self.group_size
        return torch.zeros_like(cols)

    def overhead_bits(self, out_features: int, in_features: int) -> int:
        """Storage for the per-cell parameters: an fp16 scale, plus a `bits`-wide zero-point if asymmetric."""
        per_cell = 16 + (0 if self.sym else self.bits)
        return self.n_cells(out_features, in_features) * per_cell

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return self.bits * out_features * in_features + self.overhead_bits(out_features, in_features)

    # ------------------------------------------------------------------ parameters and rounding

    def params_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for cells whose weights lie in [xmin, xmax] (fp32 tensors of one shape)."""
        if self.sym:
            amax = torch.maximum(xmin.abs(), xmax.abs())
            scale = 2 * amax / self.maxq
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            xmin = torch.clamp(xmin, max=0)
            xmax = torch.clamp(xmax, min=0)
            scale = (xmax - xmin) / self.maxq
            # An all-zero cell: any positive scale represents it exactly (codes == zero).
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, zero

    def cell_range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell (min, max) of a full weight, shaped like `param_shape`."""
        out_features, in_features = w.shape
        if self.granularity == "tensor":
            return w.min().reshape(1, 1), w.max().reshape(1, 1)
        if self.granularity == "channel":
            return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        # A narrow last group is padded with a copy of its own first column (`cells_view`).
        cells = cells_view(w, self).reshape(out_features, self.n_groups(in_features), self.group_size)
        return cells.amin(dim=2), cells.amax(dim=2)

    def fit(self, w: torch.Tensor, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max (scale, zero) per cell of w; ``clip`` (per cell, <= 1) shrinks the range."""
        xmin, xmax = self.cell_range(w.float())
        if clip is not None:
            xmin, xmax = xmin * clip, xmax * clip
        return self.params_from_range(xmin, xmax)

    def expand(self, param: torch.Tensor, in_features: int) -> torch.Tensor:
        """A per-cell parameter broadcast to (rows or 1, in_features)."""
        if self.granularity != "group":
            return param
        return param[:, self.column_group(in_features, device=param.device)]

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) of w for already broadcastable scale/zero."""
        return torch.div(w, scale).round_().add_(zero).clamp_(0, self.maxq)  # in place after the division

    @staticmethod
    def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.sub(codes, zero).mul_(scale)


@dataclass
class QuantizedWeight:
    """A quantize-dequantized weight and the integers that reproduce it.

    ``weight == (codes - expand(zero)) * expand(scale)`` exactly (fp32), in the coordinates of the
    module that stores it (after any AWQ fold).
    """

    weight: torch.Tensor  # fp32 (out, in)
    codes: torch.Tensor  # uint8 (out, in)
    scale: torch.Tensor  # fp32, grid.param_shape
    zero: torch.Tensor  # int32, grid.param_shape
    grid: QuantGrid
    clip: torch.Tensor | None = None  # AWQ per-cell range shrink, if searched

    def max_levels(self) -> int:
        """The largest number of distinct codes in any cell."""
        return max_levels_per_cell(self.codes, self.grid)

    def to_cpu(self) -> "QuantizedWeight":
        return QuantizedWeight(
            weight=self.weight.cpu(), codes=self.codes.cpu(), scale=self.scale.cpu(), zero=self.zero.cpu(),
            grid=self.grid, clip=None if self.clip is None else self.clip.cpu(),
        )


def _round(w: torch.Tensor, grid: QuantGrid, scale: torch.Tensor, zero: torch.Tensor):
    """(codes as float, dequantized weight) of a float32 w, both (out, in).

    Whole groups are rounded on the (out, n_groups, group) view with the parameters broadcast over
    the group: the same operations on the same values as expanding them to (out, in) first, so the
    same bits, without materialising two weight-sized gathers (the search loops of AWQ round a weight
    dozens of times per Linear)."""
    rows, in_features = w.shape
    if grid.granularity == "group" and in_features % grid.group_size == 0:
        cells = w.reshape(rows, in_features // grid.group_size, grid.group_size)
        s, z = scale[:, :, None], zero[:, :, None]
        codes = grid.quantize(cells, s, z)
        return codes.reshape(rows, in_features), grid.dequantize(codes, s, z).reshape(rows, in_features)
    s, z = grid.expand(scale, in_features), grid.expand(zero, in_features)
    codes = grid.quantize(w, s, z)
    return codes, grid.dequantize(codes, s, z)


def quantize_with_params(w: torch.Tensor, grid: QuantGrid, scale: torch.Tensor, zero: torch.Tensor,
                         clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round every weight to the nearest level of its cell's grid."""
    codes, weight = _round(w.float(), grid, scale, zero)
    return QuantizedWeight(
        weight=weight, codes=codes.to(torch.uint8), scale=scale.float(),
        zero=zero.to(torch.int32), grid=grid, clip=clip,
    )


def quantize_rtn(w: torch.Tensor, grid: QuantGrid, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with min-max parameters per cell."""
    scale, zero = grid.fit(w, clip)
    return quantize_with_params(w, grid, scale, zero, clip)


def rtn_weight(w: torch.Tensor, grid: QuantGrid, clip: torch.Tensor | None = None) -> torch.Tensor:
    """``quantize_rtn(w, grid, clip).weight`` alone (no uint8 codes): for searches that only compare."""
    scale, zero = grid.fit(w, clip)
    return _round(w.float(), grid, scale, zero)[1]


def cells_view(x: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """(n_cells, cell_width) view of a (out, in) tensor; a narrow last group is padded with a copy of
    its row's first element of that cell (adds no new value)."""
    out_features, in_features = x.shape
    if grid.granularity == "tensor":
        return x.reshape(1, -1)
    if grid.granularity == "channel":
        return x
    g = grid.group_size
    n = grid.n_groups(in_features)
    pad = n * g - in_features
    if pad:
        x = torch.cat([x, x[:, (n - 1) * g:(n - 1) * g + 1].expand(out_features, pad)], dim=1)
    return x.reshape(out_features * n, g)


def max_levels_per_cell(values: torch.Tensor, grid: QuantGrid) -> int:
    """The largest number of distinct values in any cell of ``values`` (codes or weights)."""
    return int(max_levels_tensor(values, grid))


def max_levels_tensor(values: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """`max_levels_per_cell` as a 0-dim tensor on the values' device, for a caller that reads several
    statistics at once."""
    cells = cells_view(values, grid)
    if values.dtype == torch.uint8:  # codes: which of the 256 values each cell holds, one scatter
        present = torch.zeros(cells.shape[0], 256, dtype=torch.bool, device=cells.device)
        return present.scatter_(1, cells.long(), True).sum(dim=1).max()
    ordered = torch.sort(cells, dim=1).values  # any values (a weight): distinct neighbours once sorted
    return (1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)).max()


@contextlib.contextmanager
def tf32_products(on_cuda: bool, allow: bool = True):
    """Float32 matrix products in TF32 on CUDA, where ~3 significant digits are plenty: AWQ's searches
    (their inputs are the model's fp16/bf16 activations, exact in TF32's 10-bit mantissa; the loss
    differences between candidates are far larger) and GPTQ's report statistics (error ratios quoted
    to 3-4 digits). Several times faster than full fp32. Never around GPTQ's own column loop, whose
    codes must be the reference's. ``allow=False``: full fp32 products inside, for a quadratic form
    d G dᵀ that may cancel (AWQ's clip search by Gram matrices)."""
    if not on_cuda:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@dataclass
class LayerResult:
    """What a method did to one Linear.

    AWQ folds make the module see ``original input / in_scale`` and produce ``original output /
    out_scale``; `effective_weight` maps a stored weight back to the original coordinates, where
    errors are measured."""

    qweight: QuantizedWeight
    in_scale: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    # relative output error on the calibration inputs: a float, or a 0-dim tensor still on the device
    # (read with the unit's other statistics, `records`)
    calib_error: float | torch.Tensor | None = None
    rtn_calib_error: float | torch.Tensor | None = None  # the same for plain RTN of the original weight (GPTQ/AWQ)
    info: dict | None = None  # values may be `span_clock.Later` (a unit's device spans, read later)
    check: DeviceCheck | None = None

    def effective_weight(self, stored: torch.Tensor) -> torch.Tensor:
        weight = stored.float()
        if self.out_scale is not None:
            weight = weight * self.out_scale.to(weight.device)[:, None]
        if self.in_scale is not None:
            weight = weight / self.in_scale.to(weight.device)[None, :]
        return weight


@dataclass
class DeviceCheck:
    """A condition a method computed on the device (GPTQ: its Hessian had data and factored): ``flags``
    (a bool tensor) all true, else ``fail(flags)`` (the flags as python bools) is the error to raise.
    Read with the unit's statistics, after the host has queued the next unit's work (`records`)."""

    flags: torch.Tensor
    fail: Callable[[list[bool]], Exception]


def output_error_terms(x: torch.Tensor, reference: torch.Tensor, approx: torch.Tensor,
                       chunk_rows: int = 4096) -> torch.Tensor:
    """(||x (reference - approx)^T||², ||x reference^T||²) as a float64 tensor on x's device, not yet
    read: the two sums of `relative_output_error`, for a caller that reads several at once."""
    delta = (reference - approx).float()
    reference = reference.float()
    totals = torch.zeros(2, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        xs = x[start:start + chunk_rows].float()
        totals[0] += (xs @ delta.T).square().sum(dtype=torch.float64)
        totals[1] += (xs @ reference.T).square().sum(dtype=torch.float64)
    return totals


def relative_output_error(x: torch.Tensor, reference: torch.Tensor, approx: torch.Tensor,
                          chunk_rows: int = 4096) -> float:
    """||x (reference - approx)^T|| / ||x reference^T|| (Frobenius), biases excluded."""
    num, den = output_error_terms(x, reference, approx, chunk_rows).tolist()
    return math.sqrt(num / den) if den > 0 else float("nan")


def relative_hessian_error(hessian: torch.Tensor, reference: torch.Tensor, approx: torch.Tensor) -> float:
    """The same ratio from H = sum x x^T: tr(D H D^T) / tr(W H W^T) with D = W - W_hat."""
    delta = (reference - approx).float()
    reference = reference.float()
    num = float(((delta @ hessian) * delta).sum())
    den = float(((reference @ hessian) * reference).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")
