"""GPTQ, readable: the whole algorithm in one function, shaped like the IST-DASLab reference ``fasterquant``.

This is the specification `gptq.quantize_layer` (fixed buffers, CUDA graphs, the Triton kernel) is tested against: the
same integer codes, dequantized weights, scales and zeros, bit for bit, on CPU (tests) and on CUDA
(``scripts/bench_gpu.py --check-reference``). It is not used to quantize models.

Deliberate differences from IST-DASLab's ``fasterquant`` (documented in `gptq`):

- the factor U of H⁻¹ comes from the reversed H (`reversed_inverse_factor`: two factorisation-sized
  steps, not three); ``inverse_factor="ist"`` takes IST-DASLab's cholesky → cholesky_inverse →
  cholesky instead, the same matrix to float rounding;
- a dead input (H_jj = 0) keeps its column, plainly rounded (the reference zeroes it);
- group parameters are found on the *error-updated* columns of the group when the loop enters it
  (the reference reads the columns of W that the current block's updates have not reached yet;
  the two agree when every group starts a block, e.g. group 128 with block 128). With act-order the
  groups are static (the reference's ``static_groups=True``): found on the original W up front.

Storage: the loop keeps Wᵀ, so that a weight column is a contiguous row. Every arithmetic step is
one IEEE-rounded fp32 operation in a fixed order, as the fast paths perform it: the in-block update
is a product, then a subtraction (as ``fasterquant``'s ``W1 -= err.matmul(Hinv1[i])``; never a fused
multiply-add), the lazy update of later columns the same ``addmm_`` the fast paths call. Float
rounding is then identical too, which is what lets the tests demand equal codes, not close ones.
"""

from __future__ import annotations

import torch

from .quantizer import QuantGrid, QuantizedWeight, tf32_products


def find_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of cells spanning [xmin, xmax]; codes 0..2^b-1 with w_hat = (q - zero) * scale."""
    maxq = 2**bits - 1
    if sym:
        scale = 2 * torch.maximum(xmin.abs(), xmax.abs()) / maxq  # all 2^b codes, zero in the middle
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        xmin, xmax = torch.clamp(xmin, max=0), torch.clamp(xmax, min=0)  # 0 is always a level
        scale = (xmax - xmin) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero cell
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def _static_params(W: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of every cell from the original weight (each group from its own columns)."""
    if grid.granularity == "tensor":
        return find_params(W.min().reshape(1, 1), W.max().reshape(1, 1), grid.bits, grid.sym)
    if grid.granularity == "channel":
        return find_params(W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True), grid.bits, grid.sym)
    groups = [W[:, k:k + grid.group_size] for k in range(0, W.shape[1], grid.group_size)]
    xmin = torch.stack([c.amin(dim=1) for c in groups], dim=1)
    xmax = torch.stack([c.amax(dim=1) for c in groups], dim=1)
    return find_params(xmin, xmax, grid.bits, grid.sym)


def ist_inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) as IST-DASLab computes it: Cholesky, its
    inverse, Cholesky again."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("the damped Hessian is not positive definite")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


INVERSE_LEAF = 512  # up to this size, one triangular solve against the identity


def lower_inverse(L: torch.Tensor, leaf: int = INVERSE_LEAF) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L, by halves: for L = [[A, 0], [C, D]],

        L⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]],

    A⁻¹ and D⁻¹ the same way down to ``leaf`` rows, each solved against the identity there. That is
    2n³/3 multiply-adds in full-float32 matrix products, where one solve of L against the whole
    identity takes n³ in a triangular solve (which does not know that its right side is triangular):
    the GPTQ factor of a 10240-wide Hessian was one of the largest steps of a block."""
    out = torch.zeros_like(L)
    with tf32_products(L.is_cuda, allow=False):  # the factor the column loop reads: full float32
        _lower_inverse_into(L, out, leaf)
    return out


def _lower_inverse_into(L: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    n = L.shape[0]
    if n <= leaf:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, device=L.device, dtype=L.dtype), upper=False))
        return
    h = max(leaf, (n // 2) // 64 * 64)  # the upper half on a multiple of 64 rows, for the products' tiles
    _lower_inverse_into(L[:h, :h], out[:h, :h], leaf)
    _lower_inverse_into(L[h:, h:], out[h:, h:], leaf)
    c_times_a_inverse = L[h:, :h] @ out[:h, :h]
    out[h:, :h].addmm_(out[h:, h:], c_times_a_inverse, beta=0, alpha=-1)


def reversed_inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """The same U from one Cholesky and one triangular inverse, as the fast path computes it.

    With P the reversal (P H P: rows and columns in reverse order) and P H P = L Lᵀ:
    H⁻¹ = P L⁻ᵀ L⁻¹ P = UᵀU for U = P L⁻¹ P, which is upper triangular with a positive diagonal,
    hence *the* Cholesky factor. Two factorisation-sized steps instead of three (cholesky_inverse is
    two triangular solves); the two factors agree to float rounding, not bit for bit (tests)."""
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        raise ValueError("the damped Hessian is not positive definite")
    return lower_inverse(L).flip(0, 1)


def fasterquant(weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid, *, damp: float = 0.01,
                block_size: int = 128, act_order: bool = False, inverse_factor: str = "reversed") -> QuantizedWeight:
    """Quantize ``weight`` (out x in) given H = sum x xᵀ of its calibration inputs.
    ``inverse_factor``: "reversed" (the fast path's) or "ist" (IST-DASLab's steps to the same matrix)."""
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    # Which cell each column belongs to, and the cell parameters known up front (static) or not yet.
    g, maxq = grid.group_size, grid.maxq
    grouped = grid.granularity == "group"
    static = not grouped or act_order
    n_groups = -(-columns // g) if grouped else 1
    cell_of = [j // g if grouped else 0 for j in range(columns)]
    if static:
        scale, zero = _static_params(W, grid)
    else:
        scale = torch.zeros(rows, n_groups, device=W.device)
        zero = torch.zeros(rows, n_groups, device=W.device)

    perm = None
    if act_order:  # columns with the largest H_jj first
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        cell_of = [cell_of[j] for j in perm.tolist()]

    # Hinv: the upper Cholesky factor of (H + λI)^-1, λ = damp · mean(diag H).
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = ist_inverse_factor(H) if inverse_factor == "ist" else reversed_inverse_factor(H)

    WT = W.T.contiguous()  # WT[j] is column j of W
    scaleT, zeroT = scale.T.contiguous(), zero.T.contiguous()
    QT, codesT = torch.empty_like(WT), torch.empty_like(WT)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if not static and col % g == 0:
                # The group's parameters from its columns as they are now (error feedback included);
                # columns past this block still lack this block's lazy update: apply it for them.
                end = min(col + g, columns)
                current = W1[i:min(end, i2) - i1]
                if end > i2:
                    current = torch.cat([current, WT[i2:end] - Hinv[i1:col, i2:end].T @ Err1[:i]], dim=0)
                scaleT[cell_of[col]], zeroT[cell_of[col]] = find_params(
                    current.amin(dim=0), current.amax(dim=0), grid.bits, grid.sym)
            s, z = scaleT[cell_of[col]], zeroT[cell_of[col]]
            w = W1[i]
            q = torch.div(w, s).round_().add_(z).clamp_(0, maxq)  # the integer code
            dq = torch.sub(q, z).mul_(s)  # its value
            err = torch.sub(w, dq).div_(Hinv1[i, i])
            W1[i + 1:] -= torch.outer(Hinv1[i, i + 1:], err)  # spread the error over the block's later columns
            codesT[col], QT[col], Err1[i] = q, dq, err
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # ... and, lazily, over every later column

    codes, deq = codesT.T, QT.T
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, deq = codes[:, inverse], deq[:, inverse]
    return QuantizedWeight(weight=deq.contiguous(), codes=codes.to(torch.uint8).contiguous(),
                           scale=scaleT.T.contiguous(), zero=zeroT.T.contiguous().to(torch.int32), grid=grid)


__all__ = ["fasterquant", "find_params", "lower_inverse", "reversed_inverse_factor"]
