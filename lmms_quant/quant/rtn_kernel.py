"""The round-to-nearest error W - RTN(W) of a group grid in one pass (Triton, CUDA), with AWQ's options.

AWQ's searches and GPTQ's report round a weight dozens of times per Linear only to compare the
result with the weight: D = W - Q(W diag(s), clip) diag(1/s), for candidate input scales s (AWQ's
scale search), per-cell range shrinks (its clip search), or neither (the RTN reference of GPTQ's
report). In torch that is ~14 passes over a weight-sized tensor (scaled copy, min, max, divide,
round, add, clamp, subtract, multiply, unscale, subtract). Here one program holds R rows x one group
of W in registers and writes D once; K candidate scales are K slices of the launch.

`rtn_delta` is the entry point (``rounded=True``: the rounded weights themselves, for the parent
search's candidate weights): the kernel where it serves (CUDA, triton, a group grid), else the
torch reference, `rtn_delta_reference`, written with `quantizer.rtn_weight` itself. The same bits
either way, as in `gptq_kernel`: every step is the IEEE-rounded fp32 operation torch does, in its
order — divisions by tensors through ``div_rn``, a division by the python scalar 2^b - 1 as torch
does it on CUDA (a product with its fp32 reciprocal), no fused multiply-adds
(``enable_fp_fusion=False``), round-half-to-even by the 1.5·2^23 trick. Tests run this kernel through
Triton's CPU interpreter against the reference.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from . import gptq_kernel
from .quantizer import QuantGrid, rtn_weight

try:  # triton comes with torch's CUDA wheels; without it (CPU torch) the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_GROUP = 256  # wider groups (and channel / tensor grids) take the torch reference
_ROWS_PER_PROGRAM = 16
_state = {"disabled": False}


def rtn_delta_reference(w: torch.Tensor, grid: QuantGrid, col_scale: torch.Tensor | None = None,
                        clip: torch.Tensor | None = None, *, rounded: bool = False) -> torch.Tensor:
    """W - Q(W diag(s), clip) diag(1/s) in torch (``rounded``: Q(W diag(s), clip) diag(1/s) itself):
    ``col_scale`` (K, in) gives K candidates, shaped (K, out, in); without it the result is (out, in).
    ``clip``: per cell, as `QuantGrid.fit` takes it, or (K, cells...) for K candidate clips of W itself
    (K results; not with ``col_scale``)."""
    w = w.float()
    if clip is not None and clip.dim() == 3:
        if col_scale is not None:
            raise ValueError("rtn_delta: candidate clips (a 3-d clip) and candidate scales cannot be combined")
        return torch.stack([rtn_weight(w, grid, c) if rounded else w - rtn_weight(w, grid, c) for c in clip])
    if col_scale is None:
        return rtn_weight(w, grid, clip) if rounded else w - rtn_weight(w, grid, clip)
    s = col_scale.float()[:, None, :]
    scaled = (w[None] * s).reshape(-1, w.shape[1])
    cell_clip = None if clip is None else clip.repeat(col_scale.shape[0], 1)
    weights = rtn_weight(scaled, grid, cell_clip).reshape(col_scale.shape[0], *w.shape).div_(s)
    return weights if rounded else w[None] - weights


def serves(w: torch.Tensor, grid: QuantGrid) -> bool:
    """The kernel computes this delta: triton imports, LMMS_QUANT_RTN_KERNEL is not 0, a group grid of
    at most MAX_GROUP columns, and W on CUDA (or anywhere, under Triton's interpreter)."""
    return (triton is not None and not _state["disabled"] and os.environ.get("LMMS_QUANT_RTN_KERNEL", "1") != "0"
            and grid.granularity == "group" and grid.group_size <= MAX_GROUP and w.dim() == 2
            and (w.is_cuda or gptq_kernel.INTERPRETED))


def rtn_delta(w: torch.Tensor, grid: QuantGrid, col_scale: torch.Tensor | None = None,
              clip: torch.Tensor | None = None, *, rounded: bool = False) -> torch.Tensor:
    """`rtn_delta_reference`'s values, by the kernel where it serves."""
    if clip is not None and clip.dim() == 3 and col_scale is not None:
        raise ValueError("rtn_delta: candidate clips (a 3-d clip) and candidate scales cannot be combined")
    if not serves(w, grid):
        return rtn_delta_reference(w, grid, col_scale, clip, rounded=rounded)
    return _launch(w, grid, col_scale, clip, rounded)


if triton is not None:
    from .gptq_kernel import _params_from_range, _round_half_even  # (the same steps in both kernels)

    def _rtn_delta(W, S, C, D, rows, cols, sw, ss, sck, sc, sdk, sd, maxq, inv_maxq,
                   R: tl.constexpr, GB: tl.constexpr, GROUP: tl.constexpr, HAS_S: tl.constexpr,
                   HAS_CLIP: tl.constexpr, SYM: tl.constexpr, HALF: tl.constexpr, RECIPROCAL: tl.constexpr,
                   ROUNDED: tl.constexpr):
        """Program (row tile, group, candidate): D = W - Q(W s, clip) / s on R rows x one group
        (ROUNDED: Q(W s, clip) / s)."""
        pr, pg, pk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = pr * R + tl.arange(0, R)
        j = tl.arange(0, GB)
        c = pg * GROUP + j
        rmask = r < rows
        cmask = (j < GROUP) & (c < cols)
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(W + r[:, None] * sw + c[None, :], mask=mask, other=0.0)
        if HAS_S:
            s = tl.load(S + pk * ss + c, mask=cmask, other=1.0)
            x = w * s[None, :]
        else:
            x = w
        xmin = tl.min(tl.where(mask, x, float("inf")), axis=1)
        xmax = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        if HAS_CLIP:
            shrink = tl.load(C + pk * sck + r * sc + pg, mask=rmask, other=1.0)
            xmin = xmin * shrink
            xmax = xmax * shrink
        scale, zero = _params_from_range(xmin, xmax, maxq, inv_maxq, SYM, HALF, RECIPROCAL)
        q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(x, scale[:, None])) + zero[:, None], 0.0), maxq * 1.0)
        deq = (q - zero[:, None]) * scale[:, None]
        if HAS_S:
            deq = tl.div_rn(deq, s[None, :])
        if ROUNDED:
            tl.store(D + pk * sdk + r[:, None] * sd + c[None, :], deq, mask=mask)
        else:
            tl.store(D + pk * sdk + r[:, None] * sd + c[None, :], w - deq, mask=mask)

    # With TRITON_INTERPRET=1 set before triton is imported, this is Triton's CPU interpreter (tests).
    _kernel = triton.jit(_rtn_delta)


def _launch(w: torch.Tensor, grid: QuantGrid, col_scale: torch.Tensor | None, clip: torch.Tensor | None,
            rounded: bool):
    w = w.float().contiguous()
    rows, cols = w.shape
    clip_k = clip is not None and clip.dim() == 3  # candidate clips: one per slice of the launch
    k = col_scale.shape[0] if col_scale is not None else clip.shape[0] if clip_k else 1
    stacked = col_scale is not None or clip_k
    out = torch.empty((k, rows, cols) if stacked else (rows, cols), device=w.device)
    s = w if col_scale is None else col_scale.float().contiguous()  # (unused when absent)
    shrink = w if clip is None else clip.float().contiguous()
    n_groups = grid.n_groups(cols)
    inv_maxq = float(np.float32(1.0) / np.float32(grid.maxq))
    args = (w, s, shrink, out, rows, cols, w.stride(0), s.stride(0) if col_scale is not None else 0,
            shrink.stride(0) if clip_k else 0, shrink.stride(-2) if clip is not None else 0, rows * cols, cols,
            grid.maxq, inv_maxq)
    meta = dict(R=_ROWS_PER_PROGRAM, GB=triton.next_power_of_2(grid.group_size), GROUP=grid.group_size,
                HAS_S=col_scale is not None, HAS_CLIP=clip is not None, SYM=grid.sym,
                HALF=float(2 ** (grid.bits - 1)), RECIPROCAL=w.is_cuda, ROUNDED=rounded)
    programs = (triton.cdiv(rows, _ROWS_PER_PROGRAM), n_groups, k)
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():
        _kernel[programs](*args, **meta, num_warps=4, enable_fp_fusion=False)
    return out


__all__ = ["MAX_GROUP", "rtn_delta", "rtn_delta_reference", "serves"]
