"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales, folded exactly, then rounding.

For Linears that share one input X and follow a foldable op (architecture table, `archs.Fold`):

- a_j = mean |X_j| over every calibration token; for alpha in {0, 1/grid, ..., (grid-1)/grid}:
  s = a^alpha normalised by sqrt(max s * min s), and the Linears get Q(W diag(s)) diag(1/s).
- The loss that picks alpha is the output error of the fold's *parent*: the module whose output
  carries the sum of the scale's effects, found as the Linears' common module prefix — the
  attention module for q/k/v, the MLP module for gate/up (llm-awq's ``module2inspect``,
  llm-compressor's lowest common ancestor). It is re-run on its recorded calibration calls (the
  arguments and keyword arguments of every calibration batch, `calibration.ModuleCall`) and compared
  with its floating-point output on the real tokens (`awq_parent`; on CUDA one graph replay per
  candidate where the outputs are small). A fold of one Linear is its own parent: its
  loss is ||X W^T - (X/s) Q(W diag(s))^T||^2 on its calibration inputs (output rows weighted back to
  original units when a later fold already divided them), scored through X's triangular factor
  where X is tall (`awq_scoring`). alpha = 0 is s = 1, plain RTN,
  so the chosen scale is never worse than RTN on the parent's calibration output.
- The scale is folded: the Linears' input columns are multiplied by s and the previous op divided by
  s — a LayerNorm's weight and bias, an RMSNorm's weight (Gemma's (1 + w) as a whole), or a Linear's
  output rows and bias. Folds
  are processed last-to-first in a block so that a Linear's row scale is known before its columns
  are searched (a parent re-run sees every earlier-processed fold inside it, exactly compensated).
- Clip search (optional; not for q/k, as in the reference): per cell, shrink the min-max range by
  1, 0.95, ..., 0.55 and keep the factor with the smallest output error of that cell on
  ``CLIP_ROWS`` input rows drawn evenly from all calibration batches; kept only if it lowers the
  Linear's total output error.
Linears with no exact fold are rounded (with the clip search) without scaling. On CUDA the searches'
float32 products run in TF32 (`quantizer.tf32_products`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.profiler import record_function

from lmms_quant.values import parse_bool, parse_positive_int

from .archs import FoldSite
from .awq_parent import (candidate_scales, candidates_per_batch, scaled_rtn_weight,  # noqa: F401 (the one-at-a-time form)
                         search_scale_block)
from .awq_scoring import OutputScoring
from .method import MethodConfig, RecipeError, option
from .quantizer import LayerResult, QuantGrid, QuantizedWeight, quantize_rtn, tf32_products
from .rtn_kernel import rtn_delta
from .span_clock import SpanClock

NEEDS_HESSIAN = False
NEEDS_INPUTS = True

CLIP_STEPS = 20
CLIP_MAX_SHRINK = 0.5
CLIP_ROWS = 2048
_NO_CLIP_LEAVES = ("q", "k", "qkv")


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    """grid: alpha = k/grid for k < grid; clip: the per-cell clip search."""

    grid: int = option("awq_grid", 20, lambda k, v: parse_positive_int(k, v, "e.g. 20", RecipeError))
    clip: bool = option("awq_clip", True, lambda k, v: parse_bool(k, v, RecipeError))


Config = AWQConfig


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], row_weights: list[torch.Tensor | None],
                 grids: list[QuantGrid], n_grid: int, mean_abs: torch.Tensor | None = None,
                 scored: OutputScoring | None = None) -> tuple[torch.Tensor, float, float, float]:
    """(best s, its alpha, its loss, the alpha=0 / RTN loss) for Linears sharing input ``x``, by their
    own output error on ``x`` (scored through its factor where X is tall, `awq_scoring`); ``mean_abs``
    (default: that of ``x``) is a = mean |X_j|; ``scored``: `OutputScoring.of(x)` when the caller has it."""
    mean_abs = x.float().abs().mean(dim=0) if mean_abs is None else mean_abs.to(x.device)
    scored = OutputScoring.of(x) if scored is None else scored
    scales = candidate_scales(mean_abs, n_grid)  # (n_grid, in)
    totals = torch.zeros(n_grid, device=mean_abs.device)
    for w, r, g in zip(weights, row_weights, grids):
        for ks, deltas in candidate_deltas(w, scales, g):
            totals[ks.start:ks.stop] += scored.sq_errors(deltas, r)  # a batch of candidates at once
    losses = totals.tolist()  # one device wait for the grid, not one per candidate
    k = min(range(n_grid), key=losses.__getitem__)  # the first of equal losses
    return scales[k], k / n_grid, losses[k], losses[0]


CANDIDATE_ELEMENTS = 1 << 25  # a batch of candidate errors: 128 MiB of float32


def candidate_deltas(weight: torch.Tensor, scales: torch.Tensor, grid: QuantGrid):
    """(indices, W - Q(W diag(s)) diag(1/s) stacked for their s) for batches of the candidate ``scales`` (n, in):
    K stacked candidates rounded at once, on CUDA in one pass of `rtn_kernel` (the torch form, ~14
    passes over K weight-sized tensors, was most of a linear search), the same values bit for bit
    as one candidate at a time, as every cell lies in one row. A per-tensor grid (one range over the
    whole weight) is rounded one candidate at a time."""
    per_batch = candidates_per_batch(weight, grid, CANDIDATE_ELEMENTS)
    for start in range(0, len(scales), per_batch):
        ks = range(start, min(start + per_batch, len(scales)))
        yield ks, rtn_delta(weight, grid, scales[ks.start:ks.stop])  # (K, out, in)


def fold_parent(fold: FoldSite) -> str:
    """The module whose output carries every effect of ``fold``'s scale: its Linears' common module
    prefix (the attention / MLP module of q,k,v / gate,up; the Linear itself for a fold of one)."""
    return ".".join(os.path.commonprefix([name.split(".") for name in fold.linears]))


def module_calls(unit) -> list[str]:
    """The modules whose calibration calls AWQ replays: the parents of folds of several Linears."""
    names: list[str] = []
    for fold in unit.folds:
        parent = fold_parent(fold)
        if parent not in fold.linears and parent not in names:
            names.append(parent)
    return names


def _inside(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def _self_contained(parent: str, applied: list[FoldSite]) -> bool:
    """Whether the parent's output is in original units after the folds already applied: each of them
    lies wholly inside the parent (compensated there) or wholly outside it."""
    for fold in applied:
        inside = [_inside(fold.prev_name, parent)] + [_inside(n, parent) for n in fold.linears]
        if any(inside) and not all(inside):
            return False
    return True


def apply_fold(fold: FoldSite, s: torch.Tensor, modules: dict[str, nn.Module],
               current: dict[str, torch.Tensor] | None = None) -> None:
    """Divide ``fold.prev`` by s and multiply its consumers' input columns by s (exact in FP).

    Weights of Linears present in ``current`` (fp32 working copies) are changed there; everything
    else is changed in place on the module (norms, biases, Linears that are not quantized)."""
    current = current if current is not None else {}
    with torch.no_grad():
        if isinstance(fold.prev, nn.Linear):
            rows = fold.rows or slice(None)
            if fold.prev_name in current:
                current[fold.prev_name][rows] /= s[:, None].to(current[fold.prev_name].device)
            else:
                weight = fold.prev.weight
                weight[rows] = (weight[rows].float() / s[:, None].to(weight.device)).to(weight.dtype)
        else:
            # A norm scaling by (offset + w) (Gemma: offset 1) is divided as a whole: (offset + w) / s.
            weight, offset = fold.prev.weight, fold.weight_offset
            weight.copy_(((weight.float() + offset) / s.to(weight.device) - offset).to(weight.dtype))
        bias = getattr(fold.prev, "bias", None)
        if bias is not None:
            rows = fold.rows if isinstance(fold.prev, nn.Linear) and fold.rows else slice(None)
            bias[rows] = (bias[rows].float() / s.to(bias.device)).to(bias.dtype)
        if fold.extra_bias is not None:
            fold.extra_bias.copy_((fold.extra_bias.float() / s.to(fold.extra_bias.device)).to(fold.extra_bias.dtype))
        for name in fold.linears:
            if name in current:
                current[name] *= s[None, :].to(current[name].device)
            else:
                weight = modules[name].weight
                weight.copy_((weight.float() * s[None, :].to(weight.device)).to(weight.dtype))


def group_grams(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """X_gᵀ X_g of every input group g (n_groups x group x group; a narrow last group padded with
    zero columns), in full fp32: the clip search's cell errors are quadratic forms in them."""
    n = -(-x.shape[1] // group_size)
    xp = torch.nn.functional.pad(x.to(torch.promote_types(x.dtype, torch.float32)), (0, n * group_size - x.shape[1]))
    xp = xp.reshape(x.shape[0], n, group_size).transpose(0, 1)  # (n, tokens, group)
    with tf32_products(x.is_cuda, allow=False):
        return xp.transpose(1, 2) @ xp


def _cell_sq_errors(x: torch.Tensor, delta: torch.Tensor, grid: QuantGrid,
                    row_weight: torch.Tensor | None, grams: torch.Tensor | None = None) -> torch.Tensor:
    """Output error of each cell's weights alone, shaped like grid.param_shape.

    For groups, cell (o, g)'s error ||X_g d_og||² is the quadratic form d_og (X_gᵀ X_g) d_ogᵀ:
    ``grams`` (`group_grams`, made once for all the clip steps) instead of the tokens x rows x groups
    product, group/tokens as many multiply-adds (1/16 at 2048 rows, g 128) and no intermediate
    larger than the weight. Full fp32, as the quadratic form may cancel where TF32 would not be exact."""
    rows, columns = delta.shape
    weight2 = None if row_weight is None else row_weight.square()
    if grid.granularity == "tensor":
        return OutputScoring(x).sq_error(delta, row_weight).reshape(1, 1)
    if grid.granularity == "channel":
        err = (x.float() @ delta.T).square().sum(dim=0)
        err = err if weight2 is None else err * weight2
        return err[:, None]
    g, n = grid.group_size, grid.n_groups(columns)
    grams = group_grams(x, g) if grams is None else grams
    dp = torch.nn.functional.pad(delta, (0, n * g - columns)).reshape(rows, n, g).transpose(0, 1)  # (n, rows, g)
    out = torch.empty(n, rows, device=delta.device, dtype=grams.dtype)
    chunk = max(1, (1 << 24) // max(1, n * g))
    with tf32_products(delta.is_cuda, allow=False):
        for start in range(0, rows, chunk):
            d = dp[:, start:start + chunk]
            out[:, start:start + chunk] = (torch.bmm(d, grams) * d).sum(dim=2)
    out = out.T
    return out if weight2 is None else out * weight2[:, None]


def spread_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` rows of ``x``, evenly spaced over all of it (rows come in calibration-batch order)."""
    if x.shape[0] <= n:
        return x
    return x[torch.arange(n, device=x.device) * x.shape[0] // n]


def clip_search(weight: torch.Tensor, x: torch.Tensor, grid: QuantGrid,
                row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell range shrink factor in {1, 0.95, ..., 0.55} minimising that cell's output error (the
    first of equal errors). The shrinks are tried in batches (one rounding and one product with the
    Gram matrices for K of them, `CANDIDATE_ELEMENTS`); a per-tensor grid, whose one cell is the
    whole weight, one at a time."""
    x = spread_rows(x, CLIP_ROWS).float()
    grams = group_grams(x, grid.group_size) if grid.granularity == "group" else None
    ratios = [1 - step / CLIP_STEPS for step in range(int(CLIP_MAX_SHRINK * CLIP_STEPS))]
    shape = grid.param_shape(*weight.shape)
    per_batch = candidates_per_batch(weight, grid, CANDIDATE_ELEMENTS)
    best_err = best_ratio = None
    for start in range(0, len(ratios), per_batch):
        batch = ratios[start:start + per_batch]
        clips = torch.tensor(batch, device=weight.device)[:, None, None].expand(len(batch), *shape).contiguous()
        deltas = rtn_delta(weight, grid, clip=clips)  # (K, out, in)
        stacked_weight = None if row_weight is None else row_weight.repeat(len(batch))  # per stacked row
        errs = _cell_sq_errors(x, deltas.reshape(-1, weight.shape[1]), grid, stacked_weight, grams).view(len(batch), *shape)
        del deltas
        for err, clip in zip(errs.unbind(0), clips.unbind(0)):
            if best_err is None:
                best_err, best_ratio = err, clip
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, clip, best_ratio)
    return best_ratio


def quantize_layer(weight: torch.Tensor, x: torch.Tensor, grid: QuantGrid, *, clip: bool,
                   row_weight: torch.Tensor | None = None, scored: OutputScoring | None = None) -> QuantizedWeight:
    """Round an (already scaled) weight, with the clip search when asked and when it helps (by the
    output error on ``scored``, default: on x itself)."""
    plain = quantize_rtn(weight, grid)
    if not clip:
        return plain
    scored = OutputScoring(x) if scored is None else scored
    clipped = quantize_rtn(weight, grid, clip_search(weight, x, grid, row_weight))
    err_plain = scored.sq_error(weight - plain.weight, row_weight)
    err_clipped = scored.sq_error(weight - clipped.weight, row_weight)
    return clipped if bool(err_clipped < err_plain) else plain  # one device read


def quantize_unit(unit, stats, cfg: AWQConfig) -> tuple[dict[str, LayerResult], list[dict]]:
    with tf32_products(any(t.module.weight.is_cuda for t in unit.targets)):
        return _quantize_unit(unit, stats, cfg)


def _quantize_unit(unit, stats, cfg: AWQConfig) -> tuple[dict[str, LayerResult], list[dict]]:
    targets = {t.name: t for t in unit.targets}
    modules = {t.name: t.module for t in unit.targets}
    inputs = {name: stats[name].inputs for name in targets}
    # fp32 working copies; the modules keep their original weights until the caller writes the results
    # (the search installs candidates and puts the originals back), so the report reads them there.
    current = {name: t.module.weight.detach().to(torch.float32, copy=True) for name, t in targets.items()}
    col_scale: dict[str, torch.Tensor] = {}
    row_scale: dict[str, torch.Tensor] = {}
    fold_info: dict[str, dict] = {}
    notes = []

    clock = SpanClock(any(t.module.weight.is_cuda for t in unit.targets))

    @contextlib.contextmanager
    def phase(name: str):
        """A named span for torch.profiler and the report's method phases (no device wait)."""
        with record_function(f"lmms_quant.awq.{name}"), clock.span(name):
            yield

    scoring: dict[int, OutputScoring] = {}  # per input (Linears sharing one share its object)

    def scored_of(x: torch.Tensor) -> OutputScoring:
        if id(x) not in scoring:
            scoring[id(x)] = OutputScoring.of(x)
        return scoring[id(x)]

    calls = getattr(stats, "calls", {})
    call_modules = getattr(stats, "call_modules", {})
    applied: list[FoldSite] = []
    for fold in reversed(unit.folds):
        x = inputs[fold.linears[0]]
        grids = [targets[n].grid for n in fold.linears]
        parent = fold_parent(fold)
        losses = None
        mean_abs = stats[fold.linears[0]].abs_mean
        if calls.get(parent) and _self_contained(parent, applied):
            criterion = "parent_output"
            in_parent = {n: m for n, m in modules.items() if _inside(n, parent)}
            with phase("parent_search"):
                s, alpha, loss, rtn_loss, losses = search_scale_block(
                    call_modules[parent], calls[parent], mean_abs, list(fold.linears), in_parent, current, grids,
                    cfg.grid, targets[fold.linears[0]].site.token_mask)
        else:
            criterion = "linear_output"
            with phase("input_factor"):
                scored = scored_of(x)
            with phase("linear_search"):
                s, alpha, loss, rtn_loss = search_scale(
                    x, [current[n] for n in fold.linears], [row_scale.get(n) for n in fold.linears], grids,
                    cfg.grid, mean_abs, scored=scored)
        apply_fold(fold, s, modules, current)
        applied.append(fold)
        if fold.prev_name in current:
            scale = row_scale.setdefault(fold.prev_name, torch.ones(current[fold.prev_name].shape[0],
                                                                     device=s.device))
            scale[fold.rows or slice(None)] *= s
        for n in fold.linears:
            col_scale[n] = s
            fold_info[n] = {"fold_from": fold.prev_name, "alpha": alpha, "search_loss": loss,
                            "search_loss_rtn": rtn_loss, "search_criterion": criterion, "search_parent": parent}
        note = {"prev": fold.prev_name, "linears": list(fold.linears), "alpha": alpha, "search_loss": loss,
                "search_loss_rtn": rtn_loss, "criterion": criterion, "parent": parent}
        if losses is not None:
            note["losses"] = losses
        notes.append(note)

    results = {}
    for name, t in targets.items():
        x = inputs[name]
        s = col_scale.get(name)
        r = row_scale.get(name)
        with phase("input_factor"):
            scored = scored_of(x)  # R / s factors X / s as R factors X
        scored_now = scored if s is None else scored.scaled(s)
        clip_rows = spread_rows(x, CLIP_ROWS)
        clip_rows = clip_rows if s is None else clip_rows / s[None, :]
        leaf = t.site.role.split(".")[-1]
        # the working copy is let go as its result is made: the unit's fp32 copies and its fp32 results
        # are not all alive at once (0.75 GiB each for a LLaVA-7B block)
        with phase("round_and_clip"):
            qweight = quantize_layer(current.pop(name), clip_rows, t.grid,
                                     clip=cfg.clip and leaf not in _NO_CLIP_LEAVES, row_weight=r, scored=scored_now)
        del clip_rows, scored_now
        result = LayerResult(qweight, in_scale=s, out_scale=r,
                             info={"scaled": s is not None, "clip_searched": qweight.clip is not None,
                                   **fold_info.get(name, {}), "calib_tokens": stats[name].n_calib})
        effective = result.effective_weight(qweight.weight)
        reference = t.module.weight.detach().float()
        with phase("report"):
            errors = [reference - effective, rtn_delta(reference, t.grid)]
            norm_sq, (awq_sq, rtn_sq) = scored.sq_norms(reference, errors)
            del errors
        result.calib_error = (awq_sq / norm_sq) ** 0.5 if norm_sq > 0 else float("nan")
        result.rtn_calib_error = (rtn_sq / norm_sq) ** 0.5 if norm_sq > 0 else float("nan")
        # ||X W^T|| turns the relative errors back into the absolute ones the scale search sums.
        result.info["calib_output_norm"] = norm_sq ** 0.5
        results[name] = result
    phases = clock.by_name()  # the unit's, shared out over its Linears (the report sums them)
    for result in results.values():
        result.info["phase_s"] = {k: v / len(results) for k, v in phases.items()}
        result.info["report_stats_s"] = phases.get("report", 0.0) / len(results)
    return results, notes
