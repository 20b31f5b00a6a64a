"""Binding a family table to a model: every unit with its Linears, roles and exact folds."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..recipe import COMPONENTS
from .spec import CONDITIONS, ArchitectureError, Family, Fold, MatmulWeight

log = logging.getLogger(__name__)


def is_linear(module) -> bool:
    return isinstance(module, nn.Linear)


class MatmulView(nn.Linear):
    """An nn.Linear over a matmul weight's own storage (see `spec.MatmulWeight`): ``weight`` is the
    parameter transposed (a view, no copy), so a write to it is a write to the parameter. Not a
    module of the model: `tap` runs it on ``input_from``'s output, result discarded, while the
    calibration hooks on it are installed."""

    def __init__(self, param: nn.Parameter, param_name: str, input_from: nn.Module, transposed: bool):
        nn.Module.__init__(self)
        self.bias = None
        # A tuple: neither the parameter nor the input module becomes part of this module.
        self._source = (param, param_name, input_from, transposed)

    @property
    def weight(self) -> torch.Tensor:
        # Taken afresh on every access: `model.to(device)` gives the parameter new storage in place.
        param = self._source[0].detach()
        return param.T if self.transposed else param

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def source(self) -> nn.Parameter:
        """The model's own parameter (what the size accounting and the weight cache count)."""
        return self._source[0]

    @property
    def input_module(self) -> nn.Module:
        """The model's module whose output this view reads (its unit's exit: where its input is complete)."""
        return self._source[2]

    @property
    def transposed(self) -> bool:
        return self._source[3]

    def tap(self):
        """Run this view on every output of its input module; returns the hook handle to remove."""
        return self.input_module.register_forward_hook(lambda module, args, output: self(output))


def stored_weight(module: nn.Linear) -> nn.Parameter:
    """The model parameter that holds ``module``'s weight (the matmul weight behind a `MatmulView`)."""
    return module.source if isinstance(module, MatmulView) else module.weight


@dataclass
class LinearSite:
    name: str
    module: nn.Linear
    role: str
    component: str
    stack: str | None
    block: int | None
    token_mask: str | None
    feeds_output: bool = True

    @property
    def kind(self) -> str | None:
        """``attn`` / ``mlp`` for layer_type selection; None for projections and heads."""
        kind = self.role.split(".")[0]
        return {"attn": "attn", "cross_attn": "attn", "mlp": "mlp"}.get(kind)


@dataclass
class FoldSite:
    prev_name: str
    prev: nn.Module
    rows: slice | None  # rows of prev that feed the linears (None: all)
    linears: tuple[str, ...]  # full names
    extra_bias: nn.Parameter | None = None  # a separate bias of those rows (see Fold.prev_bias)
    weight_offset: float = 0.0  # the norm scales by (offset + weight); see Fold.weight_offset


@dataclass
class UnitSite:
    """One block of a stack, or one set of non-block Linears: the step of sequential calibration."""

    name: str
    component: str
    stack: str | None
    block: int | None
    n_blocks: int | None
    linears: list[LinearSite]
    folds: list[FoldSite]
    include: str | None = None
    dropped_folds: list[str] = field(default_factory=list)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


@dataclass
class Arch:
    family: Family
    units: list[UnitSite]

    @property
    def components(self) -> tuple[str, ...]:
        present = {u.component for u in self.units if u.include is None and u.linears}
        return tuple(c for c in COMPONENTS if c in present)

    def component_of(self, param_name: str) -> str:
        """The component whose longest root holds ``param_name`` (Qwen's merger, the connector, lies
        inside the vision tower's module), or "other"."""
        best, best_len = "other", -1
        for comp, roots in self.family.roots.items():
            for root in roots:
                if _under(param_name, root) and len(root) > best_len:
                    best, best_len = comp, len(root)
        return best


def _get(modules: Mapping[str, nn.Module], path: str, family: Family) -> nn.Module:
    if path not in modules:
        raise ArchitectureError(f"{family.name}: the table names {path!r}, which the model does not have")
    return modules[path]


def _used_vision_blocks(model, n_blocks: int) -> int:
    """How many vision blocks feed the model's output, per config.vision_feature_layer (LLaVA)."""
    layer = getattr(model.config, "vision_feature_layer", None)
    if layer is None:
        return n_blocks
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    # hidden_states[k] is the output of block k-1 (index 0 is the embeddings).
    return max((k if k >= 0 else n_blocks + 1 + k) for k in layers)


def _fold_sites(folds: tuple[Fold, ...], block_path: str, block_modules: Mapping[str, nn.Module], present: set[str],
                cfg, family: Family) -> tuple[list[FoldSite], list[str]]:
    """Fold sites of ``folds`` (paths inside ``block_path``; from the model root when it is "")."""

    def full(path: str) -> str:
        return f"{block_path}.{path}" if block_path else path

    sites, dropped = [], []
    for fold in folds:
        label = f"{full(fold.prev)} -> {', '.join(fold.linears)}"
        if any(lin not in present for lin in fold.linears) or fold.prev not in block_modules:
            continue  # an alternative of the table that this config does not have
        if fold.when and not CONDITIONS[fold.when](cfg):
            dropped.append(f"{label}: not exact for this config ({fold.when} is false)")
            continue
        prev = block_modules[fold.prev]
        consumers = [block_modules[lin] for lin in fold.linears]
        if is_linear(prev):
            n_rows = prev.out_features
            rows = None
            if fold.prev_rows is not None:
                index, chunks = fold.prev_rows
                size = n_rows // chunks
                rows = slice(index * size, (index + 1) * size)
                n_rows = size
        else:
            weight = getattr(prev, "weight", None)
            if weight is None or weight.dim() != 1:
                raise ArchitectureError(f"{family.name}: fold source {full(fold.prev)} is not a norm with a weight")
            n_rows, rows = weight.shape[0], None
        if any(c.in_features != n_rows for c in consumers):
            dropped.append(f"{label}: widths differ ({n_rows} vs {[c.in_features for c in consumers]})")
            continue
        extra_bias = None
        if fold.prev_bias:
            owner, _, attr = fold.prev_bias.rpartition(".")
            extra_bias = getattr(block_modules.get(owner), attr, None)
            if extra_bias is not None and getattr(extra_bias, "shape", None) != (n_rows,):
                dropped.append(f"{label}: {fold.prev_bias} is not a bias of the folded rows")
                continue
        sites.append(FoldSite(full(fold.prev), prev, rows, tuple(full(name) for name in fold.linears), extra_bias,
                              weight_offset=fold.weight_offset))
    return sites, dropped


def _matmul_view(model, modules, path: str, spec: MatmulWeight, family: Family) -> MatmulView:
    params = dict(model.named_parameters())
    param = params.get(path)
    if param is None or param.dim() != 2:
        raise ArchitectureError(f"{family.name}: the table names the matmul weight {path!r}, which the model "
                                f"does not have as a 2-d parameter")
    return MatmulView(param, path, _get(modules, spec.input_from, family), spec.transposed)


def resolve(model, family: Family | None = None) -> Arch:
    """Bind a family table to a model: every unit with its Linears, roles and exact folds."""
    if family is None:
        from .detect import detect_family

        family = detect_family(model)
    modules = dict(model.named_modules())
    units: list[UnitSite] = []
    covered: set[str] = set()
    for part in family.parts:
        cfg = getattr(model.config, part.config, model.config) if part.config else model.config
        if part.stack is not None:
            stack = _get(modules, part.stack, family)
            n_blocks = len(stack)
            used = _used_vision_blocks(model, n_blocks) if part.component == "vit" else n_blocks
            for index, block in enumerate(stack):
                block_path = f"{part.stack}.{index}"
                block_modules = dict(block.named_modules())
                actual = {p for p, m in block_modules.items() if p and is_linear(m)}
                unknown = actual - set(part.block.linears)
                if unknown and family.strict:
                    raise ArchitectureError(
                        f"{family.name}: {block_path} has Linears the table does not describe: {sorted(unknown)}")
                missing = set(part.block.linears) - actual - part.block.optional
                if missing:
                    raise ArchitectureError(f"{family.name}: {block_path} lacks {sorted(missing)} named by the table")
                present = actual & set(part.block.linears)
                sites = [
                    LinearSite(f"{block_path}.{p}", block_modules[p], role, part.component, part.stack, index,
                               part.block.masks.get(p, part.token_mask), feeds_output=index < used)
                    for p, role in part.block.linears.items() if p in present
                ]
                folds, dropped = _fold_sites(part.block.folds, block_path, block_modules, present, cfg, family)
                units.append(UnitSite(block_path, part.component, part.stack, index, n_blocks, sites, folds,
                                      dropped_folds=dropped))
                covered |= {s.name for s in sites}
        else:
            sites = []
            for path, role in (part.linears or {}).items():
                module = _get(modules, path, family)
                if not is_linear(module):
                    raise ArchitectureError(f"{family.name}: {path} is a {type(module).__name__}, not a Linear")
                sites.append(LinearSite(path, module, role, part.component, None, None, part.token_mask))
            views = {path: _matmul_view(model, modules, path, spec, family) for path, spec in (part.matmuls or {}).items()}
            sites += [LinearSite(path, view, part.matmuls[path].role, part.component, None, None, part.token_mask)
                      for path, view in views.items()]
            folds, dropped = _fold_sites(part.folds, "", {**modules, **views}, {s.name for s in sites}, cfg, family)
            name = os.path.commonprefix([s.name.split(".") for s in sites])
            units.append(UnitSite(".".join(name) or sites[0].name, part.component, None, None, None, sites, folds,
                                  include=part.include, dropped_folds=dropped))
            covered |= {s.name for s in sites}
    arch = Arch(family, units)
    linears = [p for p, m in model.named_modules() if is_linear(m) and p not in covered]
    if family.strict:
        stray = [p for p in linears if arch.component_of(p) != "other"]
        if stray:
            raise ArchitectureError(f"{family.name}: Linears inside a component that the table does not cover: {stray}")
        unplaced = [p for p in linears if not any(_under(p, o) for o in family.outside)]
        if unplaced:
            raise ArchitectureError(
                f"{family.name}: Linears in no component and not a known task head: {unplaced}; add them to "
                f"the table (lmms_quant/quant/archs/tables) or to its outside list")
    elif family.unclassified:
        log.warning("lmms-quant: %s: Linears in no component, left in floating point by every plan: %s",
                    family.name, ", ".join(family.unclassified))
    return arch


__all__ = ["Arch", "FoldSite", "LinearSite", "MatmulView", "UnitSite", "is_linear", "resolve", "stored_weight"]
