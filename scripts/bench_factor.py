"""Where GPTQ's factor of a wide Hessian goes, and what float32-accurate tensor-core products would save.

GPTQ factors (H + λI) once per input: U, the upper Cholesky factor of H⁻¹, from one Cholesky of the
reversed H and one triangular inverse (`gptq_reference.reversed_inverse_factor`). On an OPT-2.7B
block the 10240-wide fc2 factor is the longest step of a unit's runs. This times its two parts and a
variant of the inverse whose products are "3xTF32" (each float32 operand split into a TF32 part and a
TF32 remainder, three tensor-core products summed in float32), against the float64 factor:

    python scripts/bench_factor.py --out benchmarks/engine/bench_factor_h200.json

The Hessian is that of fp16 activations with outlier channels (1 % of channels x 30, as an OPT
decoder's), damped as GPTQ damps it. Also the GPTQ codes and layer error of an fc2-shaped weight with
each inverse. Exploratory: nothing in the library uses the 3xTF32 products unless this shows them
accurate and faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 mantissa bits), to nearest (ties away), as a float32 tensor."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def mm_3xtf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_hi, b_hi = _round_tf32(a), _round_tf32(b)
    a_lo, b_lo = _round_tf32(a - a_hi), _round_tf32(b - b_hi)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = a_lo @ b_hi
        out.addmm_(a_hi, b_lo)
        out.addmm_(a_hi, b_hi)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def lower_inverse_3xtf32(L: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """`gptq_reference.lower_inverse`'s recursion with 3xTF32 products."""
    out = torch.zeros_like(L)

    def into(L, out):
        n = L.shape[0]
        if n <= leaf:
            out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, device=L.device, dtype=L.dtype), upper=False))
            return
        h = max(leaf, (n // 2) // 64 * 64)
        into(L[:h, :h], out[:h, :h])
        into(L[h:, h:], out[h:, h:])
        out[h:, :h] = -mm_3xtf32(out[h:, h:], mm_3xtf32(L[h:, :h], out[:h, :h]))

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the leaves' solves in full float32
    try:
        into(L, out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def main(argv=None) -> int:
    from lmms_quant.quant import gptq
    from lmms_quant.quant import gptq_reference as ref
    from lmms_quant.quant.quantizer import QuantGrid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2560,4096,10240,11008")
    parser.add_argument("--out", type=Path, default=Path("bench_factor.json"))
    args = parser.parse_args(argv)
    device = "cuda"
    g = torch.Generator(device=device).manual_seed(0)

    def timed(fn, repeats=3):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return result, best

    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "card": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "sizes": {}}
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(8192, n, device=device, generator=g, dtype=torch.float16)
        outliers = torch.randperm(n, device=device, generator=g)[: max(1, n // 100)]
        x[:, outliers] *= 30
        H = torch.mm(x.T, x, out_dtype=torch.float32)
        H.diagonal().add_(0.01 * H.diagonal().mean())
        Hr = H.flip(0, 1)
        L, chol_s = timed(lambda: torch.linalg.cholesky_ex(Hr)[0])
        inv32, inv32_s = timed(lambda: ref.lower_inverse(L))
        inv3x, inv3x_s = timed(lambda: lower_inverse_3xtf32(L))
        L64 = torch.linalg.cholesky(Hr.double())
        inv64 = torch.linalg.solve_triangular(L64, torch.eye(n, device=device, dtype=torch.float64), upper=False)

        def rel(a):
            return float((a.double() - inv64).norm() / inv64.norm())

        row = {"cholesky_s": chol_s, "lower_inverse_fp32_s": inv32_s, "lower_inverse_3xtf32_s": inv3x_s,
               "rel_err_fp32_vs_float64": rel(inv32), "rel_err_3xtf32_vs_float64": rel(inv3x),
               "rel_err_fp32_cholesky_vs_float64": float((L.double() - L64).norm() / L64.norm())}
        if n in (10240, 11008):  # an fc2 / down_proj: GPTQ with each inverse
            w = torch.randn(2560, n, device=device, generator=g) * 0.02
            grid = QuantGrid(bits=4, sym=False, granularity="group", group_size=128)
            codes, errors, times = {}, {}, {}
            for name, fn in (("fp32", ref.lower_inverse), ("3xtf32", lower_inverse_3xtf32)):
                gptq.lower_inverse = fn
                q, times[name] = timed(lambda: gptq.quantize_layer(w, H, grid, act_order=True))
                codes[name] = q.codes
                d = (w - q.weight).double()
                errors[name] = float(((d @ H.double()) * d).sum() / ((w.double() @ H.double()) * w.double()).sum())
            gptq.lower_inverse = ref.lower_inverse
            row.update(gptq_codes_mismatch_fraction=float((codes["fp32"] != codes["3xtf32"]).float().mean()),
                       gptq_rel_error_fp32=errors["fp32"], gptq_rel_error_3xtf32=errors["3xtf32"],
                       gptq_layer_s_fp32=times["fp32"], gptq_layer_s_3xtf32=times["3xtf32"])
        report["sizes"][str(n)] = row
        print(n, json.dumps(row), flush=True)
        x = H = Hr = L = inv32 = inv3x = L64 = inv64 = None  # before the next size is made
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
