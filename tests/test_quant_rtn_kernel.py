"""The one-pass RTN error kernel (`rtn_kernel`, what serves AWQ's searches and GPTQ's report on CUDA)
gives the torch reference's values bit for bit, for every option it takes.

Run through Triton's CPU interpreter, which must be switched on before triton is imported: hence a
subprocess, as in test_quant_gptq_kernel."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmms_quant.quant.quantizer import QuantGrid, rtn_weight
from lmms_quant.quant.rtn_kernel import rtn_delta_reference

SCRIPT = textwrap.dedent("""
    import torch
    from lmms_quant.quant import rtn_kernel
    from lmms_quant.quant.quantizer import QuantGrid

    assert rtn_kernel.gptq_kernel.INTERPRETED
    cases = 0
    for rows, cols, bits, sym, group in [(37, 96, 4, False, 32), (16, 100, 3, False, 32), (33, 64, 4, True, 64),
                                         (8, 200, 2, True, 128), (20, 48, 8, False, 16)]:
        grid = QuantGrid(bits, sym, "group", group)
        g = torch.Generator().manual_seed(rows * cols + bits)
        w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
        w[0, :7] = 0.0  # an all-zero stretch: a zero range somewhere
        w[1, : grid.group_size] = 0.0
        scales = torch.rand(5, cols, generator=g) + 0.25
        clip = 0.55 + 0.45 * torch.rand(rows, grid.n_groups(cols), generator=g)
        clips = 0.55 + 0.45 * torch.rand(3, rows, grid.n_groups(cols), generator=g)  # 3 candidate clips
        for col_scale, shrink in [(None, None), (None, clip), (scales, None), (scales, clip), (None, clips)]:
            assert rtn_kernel.serves(w, grid)
            fast = rtn_kernel.rtn_delta(w, grid, col_scale, shrink)
            ref = rtn_kernel.rtn_delta_reference(w, grid, col_scale, shrink)
            assert fast.shape == ref.shape and torch.equal(fast, ref), (rows, cols, bits, sym, group)
            fast = rtn_kernel.rtn_delta(w, grid, col_scale, shrink, rounded=True)
            ref = rtn_kernel.rtn_delta_reference(w, grid, col_scale, shrink, rounded=True)
            assert torch.equal(fast, ref), ("rounded", rows, cols, bits, sym, group)
            cases += 1
    print("cases", cases)
""")


def test_the_rtn_kernel_gives_the_torch_references_bits_with_and_without_scales_and_clips():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LMMS_QUANT_RTN_KERNEL": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["cases", "25"]


def test_the_reference_is_the_weight_less_its_rounding_candidate_by_candidate():
    grid = QuantGrid(3, False, "group", 16)
    w = torch.randn(12, 40)
    scales = torch.rand(3, 40) + 0.5
    deltas = rtn_delta_reference(w, grid, scales)
    weights = rtn_delta_reference(w, grid, scales, rounded=True)
    for k in range(3):
        assert torch.equal(weights[k], rtn_weight(w * scales[k], grid) / scales[k])
        assert torch.equal(deltas[k], w - weights[k])
    clip = torch.full((12, grid.n_groups(40)), 0.8)
    assert torch.equal(rtn_delta_reference(w, grid, clip=clip), w - rtn_weight(w, grid, clip))
    assert not torch.equal(rtn_delta_reference(w, grid, clip=clip), rtn_delta_reference(w, grid))
    clips = torch.stack([clip, clip * 0.7])
    assert torch.equal(rtn_delta_reference(w, grid, clip=clips)[1], w - rtn_weight(w, grid, clip * 0.7))
    with pytest.raises(ValueError, match="cannot be combined"):
        rtn_delta_reference(w, grid, scales[:2], clips)


@pytest.mark.parametrize("clip,scaled", [(False, False), (True, True)])
def test_the_rtn_kernel_compiles_for_hopper_with_exactly_rounded_steps_and_no_fused_multiply_adds(clip, scaled):
    pytest.importorskip("triton")
    from triton_ptx import hopper_ptx

    from lmms_quant.quant import rtn_kernel

    pointers = {"W": "*fp32", "S": "*fp32", "C": "*fp32", "D": "*fp32"}
    const = dict(R=16, GB=128, GROUP=128, HAS_S=scaled, HAS_CLIP=clip, SYM=False, HALF=8.0, RECIPROCAL=True,
                 ROUNDED=False)
    ptx = hopper_ptx(rtn_kernel._kernel, rtn_kernel._rtn_delta, pointers, const, num_warps=4)
    assert "fma" not in ptx
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
    assert ptx.count("add.rn.f32") >= 2  # the rounding trick survives as two additions
