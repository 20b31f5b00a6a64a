"""GPTQ's fast column loop (fixed buffers, CUDA graphs) gives the same integer codes as the readable one.

The specification is `lmms_quant.quant.gptq_reference.fasterquant` (the whole algorithm in one
function, shaped like the IST-DASLab reference, with its grid parameters written out from the
formulas). It replaced the kernel-by-kernel loop kept here before (commit e2102ee's), with the fixed
formulas of issue 13, so the codes pinned changed on purpose: a symmetric grid uses all 2^b codes
(s = 2 max|w| / (2^b - 1), z = 2^(b-1)), and a narrow last group's static range comes from its own
columns."""

import pytest
import torch

from lmms_quant.quant import gptq
from lmms_quant.quant.gptq_reference import fasterquant
from lmms_quant.quant.quantizer import QuantGrid, quantize_rtn


def reference_quantize_layer(weight, hessian, grid, *, damp=0.01, block_size=128, act_order=False):
    q = fasterquant(weight, hessian, grid, damp=damp, block_size=block_size, act_order=act_order)
    return q.codes, q.weight, q.scale, q.zero


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
    # symmetric groups found inside their blocks (the Triton kernel's symmetric in-block parameters).
    (40, 192, QuantGrid(bits=3, sym=True, granularity="group", group_size=32), 64, False),
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


@pytest.mark.parametrize("grid", [QuantGrid(bits=3, sym=False, granularity="group", group_size=32),
                                  QuantGrid(bits=4, sym=True, granularity="channel")], ids=str)
def test_the_reference_with_uncorrelated_inputs_is_round_to_nearest(grid):
    # H = I: Hinv is diagonal, no error reaches another column, every column is plainly rounded.
    w, _ = _layer(24, 96, seed=5)
    q = fasterquant(w, torch.eye(96), grid, block_size=32)
    assert torch.equal(q.codes, quantize_rtn(w, grid).codes)


def test_the_reference_spreads_rounding_error_and_beats_rtn():
    w, H = _layer(32, 128, seed=6)
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    err = lambda approx: float(((w - approx) @ H * (w - approx)).sum())  # noqa: E731
    assert err(fasterquant(w, H, grid).weight) < 0.8 * err(quantize_rtn(w, grid).weight)


def test_a_gptq_run_takes_its_jobs_weight_and_hessian_and_frees_them_once_copied():
    """quantize_unit hands GPTQ one job dict per group; the float32 weight and the Hessian (0.45 GiB for
    a LLaVA-7B down_proj) must not stay alive beside the run's own copies, and the codes are unchanged."""
    import gc
    import weakref

    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=32)
    weight, hessian = _layer(48, 128, seed=5)
    expected = gptq.quantize_rows(weight.clone(), hessian.clone(), grid, act_order=True)
    job = dict(weight=weight, hessian=hessian, grid=grid, act_order=True, overwrite_hessian=True)
    alive = [weakref.ref(weight), weakref.ref(hessian)]
    del weight, hessian
    run = gptq._Run(job)
    gc.collect()
    assert "weight" not in job and "hessian" not in job
    assert [ref() is None for ref in alive] == [True, True]
    done = gptq._complete(run)
    assert torch.equal(done.qweight.codes, expected.qweight.codes)
    assert torch.equal(done.qweight.weight, expected.qweight.weight)


def test_overwrite_hessian_damps_the_callers_hessian_in_place_and_only_then():
    """overwrite_hessian saves a copy of in x in (0.45 GiB for a LLaVA-7B down_proj) by damping the
    caller's Hessian itself; without it the caller's Hessian is left as it was. Codes are the same."""
    grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=32)
    weight, hessian = _layer(32, 96, seed=7)
    kept, damped = hessian.clone(), hessian.clone()
    plain = gptq.quantize_rows(weight, kept, grid)
    assert torch.equal(kept, hessian)
    overwritten = gptq.quantize_rows(weight, damped, grid, overwrite_hessian=True)
    assert bool((damped.diagonal() > hessian.diagonal()).all())  # λ (and 1 on the dead input) added
    assert torch.equal(plain.qweight.codes, overwritten.qweight.codes)


@pytest.mark.parametrize("n,leaf", [(96, 512), (300, 64), (333, 40)])
def test_the_triangular_inverse_is_the_inverse(n, leaf):
    # One solve (n <= leaf), and the inverse by halves with uneven halves and several levels.
    from lmms_quant.quant.gptq_reference import lower_inverse

    _, H = _layer(8, n, seed=3)
    L = torch.linalg.cholesky(H.double() + 0.1 * torch.eye(n, dtype=torch.float64))
    inverse = lower_inverse(L, leaf=leaf)
    assert torch.equal(inverse, inverse.tril())
    assert torch.allclose(inverse, torch.linalg.inv(L), rtol=1e-10, atol=1e-12)
    assert torch.allclose(inverse @ L, torch.eye(n, dtype=torch.float64), atol=1e-10)


def test_the_triangular_inverse_by_halves_is_as_accurate_in_float32_as_one_solve():
    from lmms_quant.quant.gptq_reference import lower_inverse

    _, H = _layer(8, 700, seed=4)
    L = torch.linalg.cholesky(H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(700, dtype=torch.float64))
    exact = torch.linalg.inv(L)
    halves = lower_inverse(L.float(), leaf=128).double()
    solved = torch.linalg.solve_triangular(L.float(), torch.eye(700), upper=False).double()
    assert float((halves - exact).norm()) <= 1.5 * float((solved - exact).norm())


def test_the_reversed_inverse_factor_is_the_cholesky_factor_of_the_inverse_hessian():
    # The fast path's U (one Cholesky of the reversed H, one triangular inverse) against IST-DASLab's
    # cholesky -> cholesky_inverse -> cholesky: in float64 the two must be one matrix.
    from lmms_quant.quant.gptq_reference import ist_inverse_factor, reversed_inverse_factor

    _, H = _layer(8, 96, seed=5)
    H = H.double()
    H[3, 3] = 1.0  # the dead input, decoupled as GPTQ does
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U, U_ist = reversed_inverse_factor(H), ist_inverse_factor(H)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    assert torch.allclose(U.T @ U @ H, torch.eye(96, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(U, U_ist, rtol=1e-9, atol=1e-13)


def test_gptq_with_either_inverse_factor_has_the_same_error():
    # In float32 the factors differ by rounding, which can flip a code; the layer's error must not move.
    w, H = _layer(64, 256, seed=9)
    grid = QuantGrid(bits=3, sym=False, granularity="group", group_size=32)
    errors = []
    for factor in ("reversed", "ist"):
        q = fasterquant(w, H, grid, act_order=True, inverse_factor=factor)
        delta = w - q.weight
        errors.append(float(torch.einsum("ij,jk,ik->", delta.double(), H.double(), delta.double())))
    assert abs(errors[0] - errors[1]) <= 0.01 * errors[1]
