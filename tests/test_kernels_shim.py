"""Each kernel body, taken from its Python module (the Metal body and its CUDA twin, wrapped as
metal_kernel / cuda_kernel wrap them) and compiled as C++ through kernels/shim (g++), equals its
plain-ops reference bit for bit on ragged shapes, fp16 and fp32 outputs, all 256 fp8 codes and
non-default block sizes; warp/simdgroup shuffles run as 32 real threads. On an NVIDIA machine with
mlx-cuda the CUDA twins are also run through mx.fast.cuda_kernel (marked `cuda`, skipped here).
NaNs compare as NaNs: MLX's CPU float->half cast writes the payload 0x7d00 where C++ and GPUs
write 0x7e00, a difference in no value.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from latent_kernels.affine_dequant import (
    AFFINE_DEQUANT,
    affine_dequant_kernel,
    affine_dequant_launch,
    affine_dequant_ref,
)
from latent_kernels.fp8_dequant import (
    FP8_DEQUANT,
    fp8_dequant_kernel,
    fp8_dequant_launch,
    fp8_dequant_ref,
)
from latent_kernels.fp8_matvec import (
    FP8_MATVEC,
    fp8_matvec_kernel,
    fp8_matvec_launch,
    fp8_matvec_ordered_ref,
    fp8_matvec_ref,
)
from latent_kernels.shim.harness import (
    cpp_source,
    cuda_cpp_source,
    have_compiler,
    run_cuda_body,
    run_metal_body,
)

from engine.quant.affine import quantize_affine

RUN = {"metal": run_metal_body, "cuda": run_cuda_body}

needs_gxx = pytest.mark.skipif(not have_compiler(), reason="g++ not installed")
# a fresh g++ build is ~0.3 s of CPU per kernel instantiation (cached after), more on a busy box
pytestmark = pytest.mark.slow


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = np.isnan(a.astype(np.float32))
    if not np.array_equal(nan, np.isnan(b.astype(np.float32))):
        return False
    iu = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    return bool(np.array_equal(a.view(iu)[~nan], b.view(iu)[~nan]))


def _fp8_case(n, k, seed, nan=True):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256 if nan else 0x7F, size=(n, k), dtype=np.uint8)
    if not nan:
        codes |= rng.integers(0, 2, size=(n, k), dtype=np.uint8) << 7  # signs, never 0x7f/0xff
    scales = rng.uniform(1e-3, 4.0, size=(-(-n // 128), -(-k // 128))).astype(np.float32)
    return mx.array(codes), mx.array(scales)


def test_harness_wraps_the_modules_own_string():
    launch = fp8_dequant_launch(*_fp8_case(4, 4, 0), (128, 128), mx.float16)
    assert FP8_DEQUANT.metal in cpp_source(FP8_DEQUANT, launch)
    assert FP8_DEQUANT.metal_header in cpp_source(FP8_DEQUANT, launch)
    assert FP8_DEQUANT.cuda in cuda_cpp_source(FP8_DEQUANT, launch)
    assert "using T = __half;" in cuda_cpp_source(FP8_DEQUANT, launch)


@needs_gxx
@pytest.mark.parametrize("dialect", ["metal", "cuda"])
@pytest.mark.parametrize("shape", [(300, 200), (16, 256), (1, 1)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_fp8_dequant_body_bit_exact(shape, dtype, dialect):
    w, s = _fp8_case(*shape, seed=shape[0])
    if shape == (16, 256):  # every code, each with several scales
        w = mx.arange(16 * 256, dtype=mx.uint32).astype(mx.uint8).reshape(16, 256)
    got = RUN[dialect](FP8_DEQUANT, fp8_dequant_launch(w, s, (128, 128), dtype))[0]
    assert bits_equal(got, np.array(fp8_dequant_ref(w, s, (128, 128), dtype)))


@needs_gxx
@pytest.mark.parametrize("dialect", ["metal", "cuda"])
def test_fp8_dequant_body_other_block_size(dialect):
    w, _ = _fp8_case(70, 50, seed=3)
    s = mx.array(np.random.default_rng(3).uniform(0.1, 2, size=(3, 4)).astype(np.float32))
    got = RUN[dialect](FP8_DEQUANT, fp8_dequant_launch(w, s, (32, 16), mx.float32))[0]
    assert bits_equal(got, np.array(fp8_dequant_ref(w, s, (32, 16), mx.float32)))


@needs_gxx
@pytest.mark.parametrize(
    "bits, group_size, sdt, out",
    [
        (4, 32, mx.float16, mx.float16),
        (4, 128, mx.float32, mx.float32),
        (8, 64, mx.float16, mx.float32),
        (8, 32, mx.float32, mx.float16),
    ],
)
@pytest.mark.parametrize("dialect", ["metal", "cuda"])
def test_affine_dequant_body_bit_exact(bits, group_size, sdt, out, dialect):
    w = mx.array(np.random.default_rng(bits).standard_normal((40, 256)).astype(np.float32))
    wq, scales, biases = quantize_affine(w, group_size, bits, scale_dtype=sdt)
    launch = affine_dequant_launch(wq, scales, biases, group_size, bits, out)
    got = RUN[dialect](AFFINE_DEQUANT, launch)[0]
    assert bits_equal(got, np.array(affine_dequant_ref(wq, scales, biases, group_size, bits, out)))


@needs_gxx
def test_affine_dequant_body_on_mlx_quantize_2bit():
    w = mx.random.normal((8, 128), key=mx.random.key(1))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=2)
    got = run_metal_body(
        AFFINE_DEQUANT, affine_dequant_launch(wq, scales, biases, 64, 2, mx.float32)
    )[0]
    assert bits_equal(got, np.array(affine_dequant_ref(wq, scales, biases, 64, 2, mx.float32)))


@needs_gxx
@pytest.mark.parametrize("dialect", ["metal", "cuda"])
@pytest.mark.parametrize("shape", [(300, 200), (130, 576), (7, 5)])
def test_fp8_matvec_body_bit_exact(shape, dialect):
    n, k = shape
    w, s = _fp8_case(n, k, seed=k, nan=False)
    x = mx.array(np.random.default_rng(k).standard_normal(k).astype(np.float32))
    got = RUN[dialect](FP8_MATVEC, fp8_matvec_launch(w, s, x, (128, 128), mx.float32))[0]
    assert bits_equal(got, np.array(fp8_matvec_ordered_ref(w, s, x)))
    # and the order-free spec agrees to float32 accumulation error
    spec = np.array(fp8_matvec_ref(w, s, x))
    wd = np.array(fp8_dequant_ref(w, s, (128, 128), mx.float32), np.float64)
    bound = 1e-6 * k * (np.abs(wd) @ np.abs(np.array(x, np.float64))) + 1e-6
    assert np.all(np.abs(got - spec) <= bound)


# --- the CUDA twins, on an NVIDIA machine with mlx-cuda (bench/device_check.sh) ---------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_cuda_fp8_dequant_bit_exact(dtype):
    w, s = _fp8_case(300, 200, seed=5)
    got = fp8_dequant_kernel(w, s, (128, 128), dtype, backend="cuda")
    assert bits_equal(np.array(got), np.array(fp8_dequant_ref(w, s, (128, 128), dtype)))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_affine_dequant_bit_exact(bits):
    w = mx.array(np.random.default_rng(bits).standard_normal((40, 256)).astype(np.float32))
    wq, scales, biases = quantize_affine(w, 64, bits, scale_dtype=mx.float16)
    got = affine_dequant_kernel(wq, scales, biases, 64, bits, mx.float16, backend="cuda")
    assert bits_equal(
        np.array(got), np.array(affine_dequant_ref(wq, scales, biases, 64, bits, mx.float16))
    )


@pytest.mark.cuda
def test_cuda_fp8_matvec_bit_exact():
    w, s = _fp8_case(300, 576, seed=9, nan=False)
    x = mx.array(np.random.default_rng(9).standard_normal(576).astype(np.float32))
    got = fp8_matvec_kernel(w, s, x, (128, 128), mx.float32, backend="cuda")
    assert bits_equal(np.array(got), np.array(fp8_matvec_ordered_ref(w, s, x)))


def test_dispatchers_fall_back_to_the_reference_here():
    from latent_kernels._common import backend
    from latent_kernels.affine_dequant import dequant_affine
    from latent_kernels.fp8_dequant import dequant_fp8
    from latent_kernels.fp8_matvec import matvec_fp8

    if backend() != "cpu":
        pytest.skip("a GPU backend is present")
    w, s = _fp8_case(130, 200, seed=1, nan=False)
    assert mx.array_equal(dequant_fp8(w, s), fp8_dequant_ref(w, s))
    x = mx.ones((200,))
    assert mx.array_equal(matvec_fp8(w, s, x), fp8_matvec_ref(w, s, x))
    wq, sc, bi = quantize_affine(mx.ones((4, 64)), 64, 4)
    assert mx.array_equal(dequant_affine(wq, sc, bi, 64, 4), affine_dequant_ref(wq, sc, bi, 64, 4))
    with pytest.raises(RuntimeError, match="neither Metal nor CUDA"):
        dequant_fp8(w, s, use_kernel=True)
    from latent_kernels import Format, reference

    assert (
        reference(Format.FP8_BLOCK) is fp8_dequant_ref and reference("affine") is affine_dequant_ref
    )
