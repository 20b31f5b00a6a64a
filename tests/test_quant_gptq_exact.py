"""GPTQ's fast column loop (fixed buffers, CUDA graphs) gives the same integer codes as the plain loop.

``reference_quantize_layer`` is the kernel-by-kernel loop as it stood before the performance work
(commit e2102ee), the specification of the codes. Its grid parameters are written out here from the
formulas, independently of `QuantGrid`: updated (issue 13) to the fixed formulas, so the codes it
pins changed on purpose: a symmetric grid uses all 2^b codes (s = 2 max|w| / (2^b - 1), z = 2^(b-1)),
and a narrow last group's static range comes from its own columns."""

import math

import pytest
import torch

from lmms_quant.quant import gptq
from lmms_quant.quant.quantizer import QuantGrid


def _params(xmin, xmax, bits, sym):
    maxq = 2**bits - 1
    if sym:
        scale = 2 * torch.maximum(xmin.abs(), xmax.abs()) / maxq
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        xmin, xmax = torch.clamp(xmin, max=0), torch.clamp(xmax, min=0)
        scale = (xmax - xmin) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def _static_params(W, grid):
    """Min-max parameters per cell of the original weight; each group from its own columns."""
    if grid.granularity == "tensor":
        return _params(W.min().reshape(1, 1), W.max().reshape(1, 1), grid.bits, grid.sym)
    if grid.granularity == "channel":
        return _params(W.amin(dim=1, keepdim=True), W.amax(dim=1, keepdim=True), grid.bits, grid.sym)
    g = grid.group_size
    groups = [W[:, k:k + g] for k in range(0, W.shape[1], g)]
    xmin = torch.stack([c.amin(dim=1) for c in groups], dim=1)
    xmax = torch.stack([c.amax(dim=1) for c in groups], dim=1)
    return _params(xmin, xmax, grid.bits, grid.sym)


def reference_quantize_layer(weight, hessian, grid, *, damp=0.01, block_size=128, act_order=False):
    W = weight.detach().float().clone()
    rows, columns = W.shape
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    static = grid.granularity != "group" or act_order
    n_param_rows = 1 if grid.granularity == "tensor" else rows
    n_groups = math.ceil(columns / grid.group_size) if grid.granularity == "group" else 1
    if static:
        scale, zero = _static_params(W, grid)
    else:
        scale = torch.zeros(n_param_rows, n_groups, device=W.device)
        zero = torch.zeros(n_param_rows, n_groups, device=W.device)
    column_group = [j // grid.group_size if grid.granularity == "group" else 0 for j in range(columns)]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        column_group = [column_group[j] for j in perm.tolist()]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    L, _ = torch.linalg.cholesky_ex(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    WT = W.T.contiguous()
    scaleT, zeroT = scale.T.contiguous(), zero.T.contiguous()
    deqT, codesT = torch.empty_like(WT), torch.empty_like(WT)
    g, maxq = grid.group_size, 2**grid.bits - 1
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
                    tail = WT[i2:end] - U[i1:col, i2:end].T @ Err1[:i]
                    current = torch.cat([current, tail], dim=0)
                s, z = _params(current.amin(dim=0), current.amax(dim=0), grid.bits, grid.sym)
                scaleT[column_group[col]], zeroT[column_group[col]] = s, z
            group = column_group[col]
            s, z = scaleT[group], zeroT[group]
            w, q, dq, err = W1[i], C1[i], Q1[i], Err1[i]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=dq).mul_(s)
            torch.sub(w, dq, out=err).div_(U1[i, i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
        WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    codes, deq = codesT.T, deqT.T
    if perm is not None:
        inverse = torch.argsort(perm)
        deq, codes = deq[:, inverse], codes[:, inverse]
    return codes.to(torch.uint8), deq, scaleT.T, zeroT.T


def _layer(rows, columns, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * columns, columns, generator=g) @ (torch.eye(columns) + 0.3 * torch.randn(columns, columns, generator=g))
    x[:, 3] = 0.0  # one dead input column
    return torch.randn(rows, columns, generator=g) * 0.02, x.T @ x


CASES = [
    # (rows, columns, grid, block_size, act_order): regular blocks, a partial last block, groups
    # spilling over blocks, a narrow last group, channel/tensor grids, act-order (static groups).
    (48, 256, QuantGrid(bits=4, sym=False, granularity="group", group_size=32), 128, False),
    (48, 200, QuantGrid(bits=3, sym=False, granularity="group", group_size=32), 64, False),
    (40, 192, QuantGrid(bits=4, sym=True, granularity="group", group_size=48), 32, False),
    (40, 160, QuantGrid(bits=2, sym=False, granularity="group", group_size=64), 16, False),
    (32, 192, QuantGrid(bits=4, sym=False, granularity="channel"), 64, False),
    (32, 130, QuantGrid(bits=8, sym=True, granularity="tensor"), 64, False),
    (32, 256, QuantGrid(bits=4, sym=False, granularity="group", group_size=32), 64, True),
    (32, 256, QuantGrid(bits=3, sym=False, granularity="channel"), 128, True),
    # static groups with a narrow last group (200 = 6 x 32 + 8), and symmetric static grids.
    (32, 200, QuantGrid(bits=4, sym=False, granularity="group", group_size=32), 64, True),
    (32, 200, QuantGrid(bits=3, sym=True, granularity="group", group_size=32), 64, True),
    (32, 192, QuantGrid(bits=4, sym=True, granularity="channel"), 64, False),
]


@pytest.mark.parametrize("rows,columns,grid,block_size,act_order", CASES)
def test_gptq_codes_equal_the_reference_loop(rows, columns, grid, block_size, act_order):
    w, H = _layer(rows, columns, seed=rows + columns)
    fast = gptq.quantize_layer(w, H, grid, block_size=block_size, act_order=act_order)
    codes, deq, scale, zero = reference_quantize_layer(w, H, grid, block_size=block_size, act_order=act_order)
    assert torch.equal(fast.codes, codes)
    assert torch.equal(fast.weight, deq)
    assert torch.equal(fast.scale, scale)
    assert torch.equal(fast.zero, zero.to(torch.int32))


def test_gptq_buffers_reused_across_layers_of_one_shape_keep_no_state():
    # The fixed-buffer loop is cached per shape; a second layer of that shape must not see the first.
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=32)
    w1, H1 = _layer(48, 256, seed=1)
    w2, H2 = _layer(48, 256, seed=2)
    gptq.quantize_layer(w1, H1, grid, block_size=64)
    second = gptq.quantize_layer(w2, H2, grid, block_size=64)
    assert torch.equal(second.codes, reference_quantize_layer(w2, H2, grid, block_size=64)[0])
