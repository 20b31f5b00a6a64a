"""Round-to-nearest: every weight to the nearest level of its cell's min-max grid. No data needed."""

from __future__ import annotations

import torch

from .quantizer import LayerResult, QuantGrid, QuantizedWeight, quantize_rtn

NEEDS_HESSIAN = False
NEEDS_INPUTS = False


def quantize_layer(weight: torch.Tensor, grid: QuantGrid) -> QuantizedWeight:
    return quantize_rtn(weight.detach().float(), grid)


def quantize_unit(unit, stats, plan) -> tuple[dict[str, LayerResult], list[dict]]:
    results = {t.name: LayerResult(quantize_layer(t.module.weight, t.grid)) for t in unit.targets}
    return results, []
