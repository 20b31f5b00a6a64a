"""Round-to-nearest: every weight to the nearest level of its cell's min-max grid. No data needed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .method import MethodConfig
from .quantizer import LayerResult, QuantGrid, QuantizedWeight, quantize_rtn

NEEDS_HESSIAN = False
NEEDS_INPUTS = False


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest has no settings of its own: the grid is the recipe's."""


Config = RTNConfig


def quantize_layer(weight: torch.Tensor, grid: QuantGrid) -> QuantizedWeight:
    return quantize_rtn(weight.detach().float(), grid)


def quantize_unit(unit, stats, cfg: RTNConfig) -> tuple[dict[str, LayerResult], list[dict]]:
    results = {t.name: LayerResult(quantize_layer(t.module.weight, t.grid)) for t in unit.targets}
    return results, []
