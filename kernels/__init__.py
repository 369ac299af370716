"""Our dequantization kernels: one file per kernel, each with a plain-ops reference (the spec),
a Metal body, its CUDA twin and a dispatcher that falls back to the reference (see STYLE.md).

`reference(fmt)` maps each weight format to its reference dequantizer, so tests and tools look the
oracle up by format instead of by function name. Importing this package is cheap: kernel
objects are only built on first use on a machine with the matching GPU backend.
"""

from __future__ import annotations

from enum import Enum


class Format(str, Enum):
    FP8_BLOCK = "fp8_block"  # e4m3 codes + 2-D float32 block scales (DeepSeek-V3)
    AFFINE = "affine"  # MLX affine int2/4/8 (and GGUF Q4_0/Q4_1/Q8_0 as MLX loads them)


def reference(fmt: Format | str):
    """The reference dequantizer for a format (`fp8_dequant_ref` or `affine_dequant_ref`)."""
    from .affine_dequant import affine_dequant_ref
    from .fp8_dequant import fp8_dequant_ref

    return {Format.FP8_BLOCK: fp8_dequant_ref, Format.AFFINE: affine_dequant_ref}[Format(fmt)]
