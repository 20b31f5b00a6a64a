"""GPTQ (Frantar et al., 2022): column-by-column rounding with second-order error feedback.

H = sum of x x^T over the calibration tokens reaching the layer (collected block by block, so it
reflects the already-quantized blocks before it). With U the upper Cholesky factor of (H + λI)^-1,
column i is rounded, its error e_i = (w_i - q_i) / U_ii is spread over the not yet quantized
columns (w_j -= e_i U_ij), lazily: inside a block of ``block_size`` columns at once, to later
columns once per block.

- Groups: a group's (scale, zero) come from the error-updated columns when the loop enters it.
  With ``act_order`` (columns by decreasing H_jj) the group parameters are *static*: computed up front
  on the original weight, so groups stay contiguous in the original column order.
- Dead inputs (H_jj = 0): H_jj := 1, which decouples that column; it is then plainly rounded.
  (The reference zeroes such columns; a channel that is silent on calibration data may not be silent
  on real inputs, so we keep it.)
- A layer whose H is all zero never saw data: `NoCalibrationData`, never a silent zeroing.
"""

from __future__ import annotations

import torch

from .quantizer import (LayerResult, QuantGrid, QuantizedWeight, quantize_rtn, relative_hessian_error)

NEEDS_HESSIAN = True
NEEDS_INPUTS = False


class NoCalibrationData(RuntimeError):
    """The layer's Hessian is zero: no calibration token reached it."""


class HessianNotPositiveDefinite(RuntimeError):
    pass


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, *, damp: float = 0.01,
                   block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian.detach().float().clone().to(W.device)
    if not torch.any(H != 0):
        raise NoCalibrationData("the Hessian is zero: no calibration data reached this layer")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    static = grid.granularity != "group" or act_order
    n_param_rows, n_groups = grid.param_shape(rows, columns)
    if static:
        scale, zero = grid.fit(W)
    else:
        scale = torch.zeros(n_param_rows, n_groups, device=W.device)
        zero = torch.zeros(n_param_rows, n_groups, device=W.device)
    column_group = grid.column_group(columns).tolist()  # python ints: no device syncs in the loop

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        column_group = [column_group[j] for j in perm.tolist()]

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise HessianNotPositiveDefinite(f"the damped Hessian is not positive definite (damp={damp}); increase damp")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    # Transposed: a weight column is a contiguous row here, and every per-column step below is an
    # in-place kernel on contiguous memory, with no host synchronisation.
    WT = W.T.contiguous()
    scaleT, zeroT = scale.T.contiguous(), zero.T.contiguous()
    deqT, codesT = torch.empty_like(WT), torch.empty_like(WT)
    g, maxq = grid.group_size, grid.maxq
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Q1, C1 = deqT[i1:i2], codesT[i1:i2]
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:
                end = min(col + g, columns)
                current = W1[i:min(end, i2) - i1]
                if end > i2:
                    # Columns past this block still lack this block's lazy update: apply it for them.
                    tail = WT[i2:end] - U[i1:col, i2:end].T @ Err1[:i]
                    current = torch.cat([current, tail], dim=0)
                s, z = grid.params_from_range(current.amin(dim=0), current.amax(dim=0))
                scaleT[column_group[col]], zeroT[column_group[col]] = s, z
            group = column_group[col]
            s, z = scaleT[group], zeroT[group]
            w, q, dq, err = W1[i], C1[i], Q1[i], Err1[i]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=dq).mul_(s)
            torch.sub(w, dq, out=err).div_(U1[i, i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    scale, zero = scaleT.T.contiguous(), zeroT.T.contiguous()
    deq, codes = deqT.T, codesT.T

    if perm is not None:
        inverse = torch.argsort(perm)
        deq, codes = deq[:, inverse], codes[:, inverse]
    return QuantizedWeight(weight=deq.contiguous(), codes=codes.to(torch.uint8).contiguous(), scale=scale,
                           zero=zero.to(torch.int32), grid=grid)


def quantize_unit(unit, stats, plan) -> tuple[dict[str, LayerResult], list[dict]]:
    results = {}
    for t in unit.targets:
        H = stats[t.name].hessian
        weight = t.module.weight.detach().float()
        try:
            qweight = quantize_layer(weight, H, t.grid, damp=plan.damp, block_size=plan.block_size,
                                     act_order=plan.act_order)
        except HessianNotPositiveDefinite as err:
            raise HessianNotPositiveDefinite(f"{t.name}: {err}") from None
        H = H.to(weight.device)
        results[t.name] = LayerResult(
            qweight,
            calib_error=relative_hessian_error(H, weight, qweight.weight),
            rtn_calib_error=relative_hessian_error(H, weight, quantize_rtn(weight, t.grid).weight),
            info={"damp": plan.damp, "act_order": plan.act_order, "calib_tokens": stats[t.name].n_calib},
        )
    return results, []
