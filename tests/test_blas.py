"""Preloading Debian's OpenBLAS changes MLX's speed, not its results.

Two subprocesses compute the logits of the same seeded tiny llama (fp32): one with the
reference BLAS (`LATENT_NO_OPENBLAS=1`), one re-executed through `maybe_reexec_with_openblas`.
The second must really have OpenBLAS mapped, and the logits must agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.blas import REEXEC_ENV, openblas_path

SCRIPT = r"""
import json, sys
from engine.blas import maybe_reexec_with_openblas, openblas_loaded
maybe_reexec_with_openblas()
import mlx.core as mx
from engine.models import get_model_classes
Model, Args = get_model_classes("llama")
args = Args.from_dict(dict(model_type="llama", hidden_size=256, num_hidden_layers=2,
    intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
    max_position_embeddings=128, rope_theta=10000.0))
mx.random.seed(3)
model = Model(args)
ids = mx.array([[(i * 37) % 300 for i in range(64)]])
logits = model(ids)[0]
json.dump({"openblas": openblas_loaded(), "logits": logits.tolist()}, sys.stdout)
"""


def _run(extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_ENV)}
    env.pop("LATENT_NO_OPENBLAS", None)
    env.update(extra_env)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")
@pytest.mark.skipif(openblas_path() is None, reason="no Debian OpenBLAS on this machine")
def test_openblas_preload_keeps_logits():
    ref = _run({"LATENT_NO_OPENBLAS": "1"})
    fast = _run({})
    assert not ref["openblas"]
    assert fast["openblas"]
    np.testing.assert_allclose(np.array(fast["logits"]), np.array(ref["logits"]), atol=1e-5)


def test_blas_prefill_path_matches_quantized_matmul():
    """Dequantize + GEMM for prompt chunks gives the quantized layer's outputs (1e-4)."""
    import mlx.core as mx
    import mlx.nn as nn

    from engine.blas import use_blas_prefill
    from engine.models import get_model_classes
    from engine.quant.cpu import PREFILL_MIN_ROWS

    Model, Args = get_model_classes("llama")
    args = Args.from_dict(
        dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
             max_position_embeddings=128, rope_theta=10000.0)
    )  # fmt: skip
    mx.random.seed(5)
    model = Model(args)
    nn.quantize(model, group_size=32, bits=4)
    ids = mx.array([[(i * 11) % 300 for i in range(3 * PREFILL_MIN_ROWS)]])
    ref = model(ids)
    one_ref = model(ids[:, :1])
    assert use_blas_prefill(model, force=True) > 0
    assert use_blas_prefill(model, force=True) == 0  # idempotent
    np.testing.assert_allclose(np.array(model(ids)), np.array(ref), atol=1e-4)
    # one row goes through our qmm_rows kernel: the same math with the activations rounded to
    # int16 per 32-element block (tests/test_cpu_kernels.py bounds that error per matvec)
    np.testing.assert_allclose(np.array(model(ids[:, :1])), np.array(one_ref), atol=1e-3)
