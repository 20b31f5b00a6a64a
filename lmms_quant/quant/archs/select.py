"""Selection by a recipe: which units and Linears it quantizes, at which grid."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn as nn

from ..quantizer import QuantGrid
from ..recipe import LAYER_GROUPS, LAYER_TYPES, Recipe, RecipeError
from .resolve import Arch, FoldSite, LinearSite, UnitSite


def third_of(index: int, n_blocks: int) -> str:
    if index < n_blocks // 3:
        return "front"
    if index < 2 * n_blocks // 3:
        return "middle"
    return "end"


@dataclass
class Target:
    site: LinearSite
    grid: QuantGrid

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def module(self) -> nn.Linear:
        return self.site.module


@dataclass
class Unit:
    """The selected Linears of one UnitSite, with their grids and the folds among them."""

    site: UnitSite
    targets: list[Target]
    folds: list[FoldSite]
    exit_module: nn.Module

    @property
    def name(self) -> str:
        return self.site.name


def select(arch: Arch, recipe: Recipe, model) -> list[Unit]:
    """The units and Linears ``recipe`` quantizes, in forward order. Selectors that match nothing fail."""
    selection = recipe.selection
    available = arch.components
    for comp in selection.components:
        if comp not in available:
            raise RecipeError(
                f"component={comp!r} is invalid for {arch.family.name}: the model has no {comp}; "
                f"valid: {', '.join(available)}, or all")
    targets = selection.targets(available)
    for key in selection.include:
        heads = [u for u in arch.units if u.include == key]
        if not heads:
            raise RecipeError(f"include={key!r} is invalid for {arch.family.name}: the model has no {key}; valid: none")
        if not any(u.component in targets for u in heads):
            raise RecipeError(f"include={key!r} is invalid: its component ({heads[0].component}) is not quantized "
                              f"by this recipe; valid: add {heads[0].component} to component")
    all_groups = selection.layer_groups == LAYER_GROUPS
    all_types = selection.layer_types == LAYER_TYPES
    modules = dict(model.named_modules())
    units: list[Unit] = []
    count = {c: 0 for c in targets}
    for site in arch.units:
        if site.component not in targets:
            continue
        if site.include is not None:
            if site.include not in selection.include:
                continue
            chosen = site.linears  # an explicitly requested head ignores depth/type selectors
        else:
            if site.block is not None:
                if third_of(site.block, site.n_blocks) not in selection.layer_groups:
                    continue
            elif not all_groups:
                continue
            chosen = [s for s in site.linears if all_types or s.kind in selection.layer_types]
        if not chosen:
            continue
        grid = recipe.grid.for_bits(selection.bits_for(site.component))
        names = {s.name for s in chosen}
        folds = [f for f in site.folds if all(lin in names for lin in f.linears)]
        exit_path = ".".join(os.path.commonprefix([s.name.split(".") for s in chosen]))
        # A matmul weight's Linear view is no module of the model: it is its own exit (it runs last).
        exit_module = modules[exit_path] if exit_path in modules or len(chosen) > 1 else chosen[0].module
        units.append(Unit(site, [Target(s, grid) for s in chosen], folds, exit_module))
        count[site.component] += len(chosen)
    for comp in selection.components:
        if count.get(comp, 0) == 0:
            raise RecipeError(
                f"component={comp!r} with {selection.describe_layers()} selects no weight in {arch.family.name} "
                f"(its projector/non-block Linears are selected only by layer_group=all and layer_type=all, "
                f"and a stack of n blocks has n//3 front blocks); valid: a layer_group/layer_type that "
                f"exists in that component")
    if not units:
        raise RecipeError(f"{selection.describe_layers()} selects no weight in components {'+'.join(targets)} of "
                          f"{arch.family.name}; valid: a selection that matches at least one Linear")
    return units


__all__ = ["Target", "Unit", "select", "third_of"]
