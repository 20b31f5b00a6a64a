"""GPTQ's column loop over one block as a single Triton kernel (CUDA).

The loop over a block's columns is a chain of ~8 tiny dependent kernels per column (round, error,
rank-1 update of the later columns); even replayed as a CUDA graph it is launch-bound, 3+ ms per
block of 128 columns. Here each program keeps a block x R tile of Wᵀ (R output rows) in registers and
runs the block's columns one after another itself: rows are independent given H, so programs never
talk to each other, and one launch does what the graph's ~1000 kernels did.

Same codes, bit for bit, as `gptq_reference.fasterquant` (and the torch loop in `gptq`):
- every step is one IEEE-rounded fp32 operation in the reference's order: divisions through
  ``div_rn`` (Triton's ``/`` is an approximate division), and ``enable_fp_fusion=False`` so that the
  compiler never contracts a multiply and a subtraction into one fused multiply-add, whose single
  rounding the reference (``mul`` then ``sub``) does not have;
- round-half-to-even as torch.round, through the fp32 trick (x + 1.5·2^23) - 1.5·2^23, exact for
  |x| < 2^22; larger quotients are beyond every clamp bound (|bound| <= 255) with their sign kept,
  so the clamped code is torch's;
- the selection of a column from the register tile is a max against -inf: exact, no arithmetic.

Tests run this very function through Triton's CPU interpreter against the reference; on the GPU,
``scripts/bench_gpu.py --check-reference`` does the same on real-size layers.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

from lmms_quant.values import parse_positive_int

log = logging.getLogger(__name__)

try:  # triton comes with torch's CUDA wheels; without it (CPU torch) the torch loop runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# A register tile of at most this many fp32 values per program (block x rows), and the warps per program
# when the tile is larger than 2048: the benchmark's sweep (1024..8192 values, 1..8 warps) gave the same
# codes, 0.072-0.100 s for an fc2, this default within 8 % of the best, on an H200 (benchmarks/RESULTS.md).
# Both can be overridden, to sweep again.
_TILE = 4096
TILE_ENV, WARPS_ENV = "LMMS_QUANT_GPTQ_KERNEL_TILE", "LMMS_QUANT_GPTQ_KERNEL_WARPS"
# 0: each load where it is used (the kernel's first form; the benchmark measures both, same codes).
PREFETCH_ENV = "LMMS_QUANT_GPTQ_KERNEL_PREFETCH"


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_state = {"disabled": False, "launched": False}


def fall_back(err: Exception) -> bool:
    """The first launch failed (no compiler for this card, ...): warn, and serve nothing more. Returns
    False when the kernel has launched before, i.e. the error is not the kernel's availability."""
    if _state["launched"]:
        return False
    log.warning("lmms-quant gptq: the Triton column-loop kernel failed to launch (%s); "
                "using the graphed torch loop", err)
    _state["disabled"] = True
    return True


def serves(tensor: torch.Tensor) -> bool:
    """The kernel runs this loop: triton imports, LMMS_QUANT_GPTQ_KERNEL is not 0, and the tensor is
    on CUDA (or anywhere, under Triton's interpreter)."""
    return (triton is not None and not _state["disabled"] and os.environ.get("LMMS_QUANT_GPTQ_KERNEL", "1") != "0"
            and (tensor.is_cuda or INTERPRETED))


if triton is not None:
    _MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23

    @triton.jit
    def _round_half_even(x):
        """torch.round of fp32 ``x`` for |x| < 2^22 (beyond, the sign and a magnitude past every clamp
        bound are kept): adding and subtracting 1.5·2^23 leaves no fraction bits, rounding to even."""
        return (x + _MAGIC) - _MAGIC

    @triton.jit
    def _params_from_range(xmin, xmax, maxq, inv_maxq, SYM: tl.constexpr, HALF: tl.constexpr,
                           RECIPROCAL: tl.constexpr):
        """(scale, zero) of cells with range [xmin, xmax]: `QuantGrid.params_from_range`, step for
        step. RECIPROCAL: range / maxq as torch computes it on CUDA, range * fp32(1/maxq) (torch
        divides by a scalar through its reciprocal there); an IEEE division elsewhere."""
        if SYM:
            span = 2.0 * tl.maximum(tl.abs(xmin), tl.abs(xmax))
        else:
            xmin = tl.minimum(xmin, 0.0)
            span = tl.maximum(xmax, 0.0) - xmin
        if RECIPROCAL:
            s = span * inv_maxq
        else:
            s = tl.div_rn(span, maxq * 1.0)
        s = tl.where(s > 0, s, 1.0)
        if SYM:
            z = tl.zeros_like(s) + HALF
        else:
            z = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(-xmin, s)), 0.0), maxq * 1.0)
        return s, z

    def _column_loop(W, U, S, Z, G, Q, C, E, rows, count, maxq, inv_maxq,
                     sw, su0, su1, ss0, ss1, sg, sq, sc, se, group_base,
                     BLOCK: tl.constexpr, R: tl.constexpr, STATIC: tl.constexpr, GROUP: tl.constexpr,
                     SYM: tl.constexpr, HALF: tl.constexpr, RECIPROCAL: tl.constexpr, PREFETCH: tl.constexpr):
        """One block: W (count x rows, Wᵀ's block rows), U (the block's count x count part of the upper
        Cholesky factor of H⁻¹). Writes dequantized values Q, codes C (uint8), scaled errors E; for
        non-static groups also the groups' (scale, zero) rows into S, Z at ``group_base``.
        RECIPROCAL: a group's scale range / maxq as torch computes it on CUDA, range * fp32(1/maxq)
        (torch divides by a scalar through its reciprocal there); an IEEE division elsewhere.

        PREFETCH: what a column reads from memory (its row of U; with static groups its cell's scale
        and zero, behind its group index) depends on no column before it, so it is loaded one column
        ahead (the group index two), and its latency overlaps the previous column's arithmetic. Left
        where it is used, each load waits its full latency: behind the previous column's stores, the
        compiler may not move it up (it cannot know that U, S and Z are not the buffers stored to),
        and with static groups the scale's load waits for the group index's. The values loaded and
        the arithmetic are the same either way; only when the loads are issued differs."""
        pid = tl.program_id(0)
        r = pid * R + tl.arange(0, R)
        rmask = r < rows
        k = tl.arange(0, BLOCK)
        kmask = k < count
        tile = tl.load(W + k[:, None] * sw + r[None, :], mask=kmask[:, None] & rmask[None, :], other=0.0)
        s = tl.zeros([R], dtype=tl.float32) + 1.0  # the current cell's (scale, zero), carried across columns
        z = tl.zeros([R], dtype=tl.float32)
        if PREFETCH:  # column 0's loads, and column 1's group index
            u_next = tl.load(U + k * su1, mask=(k > 0) & kmask, other=0.0)
            d_next = tl.load(U)
            if STATIC:
                g0 = tl.load(G)
                s_next = tl.load(S + g0 * ss0 + r * ss1, mask=rmask, other=1.0)
                z_next = tl.load(Z + g0 * ss0 + r * ss1, mask=rmask, other=0.0)
                g_next = tl.load(G + tl.minimum(1, count - 1) * sg)
        for i in range(count):
            if PREFETCH:
                u, d = u_next, d_next
                j = tl.minimum(i + 1, count - 1)  # the last column loads its own row again, unused
                u_next = tl.load(U + j * su0 + k * su1, mask=(k > j) & kmask, other=0.0)
                d_next = tl.load(U + j * su0 + j * su1)
                if STATIC:
                    s, z = s_next, z_next
                    s_next = tl.load(S + g_next * ss0 + r * ss1, mask=rmask, other=1.0)
                    z_next = tl.load(Z + g_next * ss0 + r * ss1, mask=rmask, other=0.0)
                    g_next = tl.load(G + tl.minimum(i + 2, count - 1) * sg)
            elif STATIC:
                g = tl.load(G + i * sg)
                s = tl.load(S + g * ss0 + r * ss1, mask=rmask, other=1.0)
                z = tl.load(Z + g * ss0 + r * ss1, mask=rmask, other=0.0)
            w = tl.max(tl.where(k[:, None] == i, tile, float("-inf")), axis=0)
            if not STATIC:
                # Every group starts in this block and ends in it (the caller checks): its parameters
                # come from its columns as they are now, error feedback included.
                if i % GROUP == 0:
                    cells = (k[:, None] >= i) & (k[:, None] < i + GROUP) & (k[:, None] < count)
                    xmin = tl.min(tl.where(cells, tile, float("inf")), axis=0)
                    xmax = tl.max(tl.where(cells, tile, float("-inf")), axis=0)
                    s, z = _params_from_range(xmin, xmax, maxq, inv_maxq, SYM, HALF, RECIPROCAL)
                    row = group_base + i // GROUP
                    tl.store(S + row * ss0 + r * ss1, s, mask=rmask)
                    tl.store(Z + row * ss0 + r * ss1, z, mask=rmask)
            q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(w, s)) + z, 0.0), maxq * 1.0)
            dq = (q - z) * s
            if not PREFETCH:
                d = tl.load(U + i * su0 + i * su1)
            err = tl.div_rn(w - dq, d)
            tl.store(Q + i * sq + r, dq, mask=rmask)
            tl.store(C + i * sc + r, q.to(tl.uint8), mask=rmask)
            tl.store(E + i * se + r, err, mask=rmask)
            later = (k > i) & kmask
            if not PREFETCH:
                u = tl.load(U + i * su0 + k * su1, mask=later, other=0.0)
            tile = tl.where(later[:, None], tile - u[:, None] * err[None, :], tile)

    # With TRITON_INTERPRET=1 set before triton is imported, this is Triton's CPU interpreter (tests).
    _kernel = triton.jit(_column_loop)


def block_supported(static: bool, grid, block_size: int) -> bool:
    """Static parameters, or groups that all start and end inside their block."""
    return static or (grid.granularity == "group" and block_size % grid.group_size == 0)


def run_block(WT, U, scaleT, zeroT, group_index, deqT, codesT, err, i1: int, i2: int, grid,
              static: bool) -> torch.Tensor:
    """Columns i1..i2 of the loop (Wᵀ rows), in place: deqT, codesT and (non-static) scaleT/zeroT rows
    are written; returns the block's scaled errors (i2 - i1, rows), a view of ``err``."""
    count, rows = i2 - i1, WT.shape[1]
    block = triton.next_power_of_2(count)
    r = max(1, min(triton.next_power_of_2(rows), _env_int(TILE_ENV, _TILE) // block))
    E = err[:count]
    W, Ub = WT[i1:i2], U[i1:i2, i1:i2]
    if Ub.stride(1) != 1:  # the kernel reads U by rows: a column-major factor is copied, a block at a time
        Ub = Ub.contiguous()
    ss1 = scaleT.stride(1) if scaleT.shape[1] > 1 else 0  # one scale for all rows (per-tensor grid)
    G = group_index[i1:i2] if static else scaleT  # unused when not static
    group_base = 0 if static else i1 // grid.group_size
    # torch on CUDA: 1/b in the operand's precision on the host, then a product (see the kernel).
    inv_maxq = float(np.float32(1.0) / np.float32(grid.maxq))
    args = (W, Ub, scaleT, zeroT, G, deqT[i1:i2], codesT[i1:i2], E, rows, count, grid.maxq, inv_maxq,
            W.stride(0), Ub.stride(0), Ub.stride(1), scaleT.stride(0), ss1, G.stride(0) if static else 0,
            deqT.stride(0), codesT.stride(0), E.stride(0), group_base)
    meta = dict(BLOCK=block, R=r, STATIC=static, GROUP=grid.group_size if not static else 1, SYM=grid.sym,
                HALF=float(2 ** (grid.bits - 1)), RECIPROCAL=WT.is_cuda,
                PREFETCH=os.environ.get(PREFETCH_ENV, "1") != "0")
    programs = (triton.cdiv(rows, r),)
    warps = _env_int(WARPS_ENV, 1 if r * block <= 2048 else 4)
    # Triton launches on torch's current device (and its current stream): with a model spread over
    # several GPUs, that is not necessarily the one holding this layer.
    with torch.cuda.device(WT.device) if WT.is_cuda else contextlib.nullcontext():
        _kernel[programs](*args, **meta, num_warps=warps, enable_fp_fusion=False)
    _state["launched"] = True
    return E


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key)
    return default if value is None else parse_positive_int(key, value, f"e.g. {default}")
