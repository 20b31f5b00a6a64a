"""What this machine's processor is, for choosing and recording the arithmetic (no torch import: the
demo reads it before torch starts, to pin the kernels torch will use)."""

from __future__ import annotations

import functools
import platform

# The instruction-set extensions that decide which kernels PyTorch, MKL and oneDNN run on x86-64.
ARITHMETIC_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo; (platform.processor(), no flags) elsewhere."""
    model, flags = None, frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or None, flags
