"""Compile one of our Triton kernels for sm_90 without a GPU, and return its PTX (the interpreter
accepts what the compiler refuses; the PTX shows what exactness needs: no fma, div.rn)."""

import inspect


def hopper_ptx(kernel, fn, pointers: dict, const: dict, num_warps: int) -> str:
    """``kernel``: the jitted kernel; ``fn``: its python function (for the argument names);
    ``pointers``: pointer arguments and their types; ``const``: the constexpr values. Other
    arguments are int32, ``inv_maxq`` fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn).parameters)
    signature = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n == "inv_maxq" else "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False}).asm["ptx"]
