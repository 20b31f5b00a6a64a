"""The Triton column-loop kernel (`gptq_kernel`, what serves GPTQ on CUDA) gives the reference's codes.

Run through Triton's CPU interpreter, which must be switched on before triton is imported: hence a
subprocess. Every case of test_quant_gptq_exact is compared with `gptq_reference.fasterquant` bit for
bit; the kernel must serve exactly the cases it supports (static parameters, or groups that start and
end inside their block), the others go through the torch loop and must agree too."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_quant_gptq_exact import CASES, _layer
    from lmms_quant.quant import gptq, gptq_kernel
    from lmms_quant.quant.gptq_reference import fasterquant

    assert gptq_kernel.INTERPRETED
    served = 0
    for rows, columns, grid, block_size, act_order in CASES:
        w, H = _layer(rows, columns, seed=rows + columns)
        run = gptq._Run(dict(weight=w, hessian=H.clone(), grid=grid, block_size=block_size, act_order=act_order))
        supported = gptq_kernel.block_supported(run.static, grid, block_size)
        assert run.kernel == supported, (rows, columns, grid, block_size, act_order)
        served += run.kernel
        for i1 in run.starts:
            run.block(i1)
        fast = run.finish().qweight
        ref = fasterquant(w, H, grid, block_size=block_size, act_order=act_order)
        for name in ("codes", "weight", "scale"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (name, rows, columns, grid, block_size)
        assert torch.equal(fast.zero, ref.zero.to(torch.int32))
    assert gptq_kernel._state["launched"] and not gptq_kernel._state["disabled"]
    print("served", served, "of", len(CASES))
""")


@pytest.mark.parametrize("prefetch", ["1", "0"])
def test_the_triton_kernel_gives_the_reference_codes_in_every_case_it_serves(prefetch):
    # with its loads issued a column ahead (the default) and where they are used
    pytest.importorskip("triton")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "LMMS_QUANT_GPTQ_KERNEL": "1",
           "LMMS_QUANT_GPTQ_KERNEL_PREFETCH": prefetch}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    served, total = (int(x) for x in proc.stdout.split()[1::2])
    assert 0 < served < total  # both kinds of case were exercised


@pytest.mark.parametrize("static,sym,prefetch", [(True, False, True), (False, False, True), (False, True, True),
                                                (True, False, False), (False, False, False)])
def test_the_kernel_compiles_for_hopper_with_exactly_rounded_steps_and_no_fused_multiply_adds(static, sym, prefetch):
    # The interpreter accepts what the compiler refuses (a plain global, ...): compile for sm_90 here,
    # without a GPU, and read the PTX for what exactness needs.
    pytest.importorskip("triton")
    from triton_ptx import hopper_ptx

    from lmms_quant.quant import gptq_kernel

    pointers = {"W": "*fp32", "U": "*fp32", "S": "*fp32", "Z": "*fp32", "G": "*i64", "Q": "*fp32", "C": "*u8",
                "E": "*fp32"}
    const = dict(BLOCK=128, R=32, STATIC=static, GROUP=1 if static else 32, SYM=sym, HALF=8.0, RECIPROCAL=True,
                 PREFETCH=prefetch)
    ptx = hopper_ptx(gptq_kernel._kernel, gptq_kernel._column_loop, pointers, const, num_warps=1)
    assert "fma" not in ptx
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
    assert ptx.count("add.rn.f32") >= 2  # the rounding trick survives as two additions
