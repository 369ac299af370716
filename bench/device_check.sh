#!/usr/bin/env bash
# One-command device check for an NVIDIA machine (FACTS.md: "The device machine"): install the
# pre-downloaded MLX wheels into /tmp/site, run the CUDA-marked kernel tests (bit-exact against
# the references) and the dequantization benchmark. Run from the repository root:
#
#     bash bench/device_check.sh            # results also land in $OUT (if set) or ./device-out
#
# Expects in .whl/: mlx-0.32.4-cp312-*.whl and mlx_cuda_13-0.32.4-*.whl, the latter possibly in
# split parts (`split -b 40M` -> mlx_cuda_13-...whl.part-aa, -ab, ...), reassembled here.
# Nothing is fetched from the network. Exit status: 0 only if the CUDA tests passed.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
SITE=/tmp/site
RESULTS="${OUT:-$ROOT/device-out}"
mkdir -p "$RESULTS" "$SITE"
log() { echo "== $*" | tee -a "$RESULTS/device_check.log"; }

log "$(date -u) on $(hostname); $($PY --version 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$RESULTS/device_check.log"

# 1. reassemble a split CUDA wheel
for first in .whl/*.whl.part-aa; do
  [ -e "$first" ] || continue
  whl="${first%.part-aa}"
  if [ ! -s "$whl" ]; then
    log "reassembling $whl"
    cat "$whl".part-* > "$whl"
  fi
done

# 2. install (no deps, no network) unless this exact site already holds mlx
if ! PYTHONPATH="$SITE" "$PY" -c "import mlx.core" 2>/dev/null; then
  log "installing $(ls .whl/mlx*.whl 2>/dev/null | tr '\n' ' ')"
  "$PY" -m pip install --no-index --no-deps --quiet --target "$SITE" .whl/mlx-*.whl .whl/mlx_cuda*.whl \
    2>&1 | tail -5 | tee -a "$RESULTS/device_check.log"
fi

# mlx-cuda links the CUDA runtime libraries; borrow the nvidia-* wheels PyTorch brought along
NV_LIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(f"{r}/*/lib/*.so*")})))
EOF
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export LATENT_NO_OPENBLAS=1

"$PY" -c "import mlx.core as mx; print('mlx', mx.__version__, 'device', mx.default_device(), 'cuda', mx.cuda.is_available())" \
  2>&1 | tee -a "$RESULTS/device_check.log"

# 3. the CUDA-marked tests: with pytest if installed, else a minimal runner over the same functions
status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  log "pytest -m cuda"
  "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_kernels_shim.py 2>&1 | tee "$RESULTS/pytest_cuda.txt"
  status=${PIPESTATUS[0]}
else
  log "pytest missing: running the cuda tests directly"
  "$PY" - <<'EOF' 2>&1 | tee "$RESULTS/pytest_cuda.txt"
import sys, types, traceback

class _Mark:  # just enough of pytest.mark for the test module to import
    def __getattr__(self, name):
        def deco(*a, **k):
            if len(a) == 1 and callable(a[0]) and not k:
                return a[0]
            return lambda f: f
        return deco

sys.modules["pytest"] = types.SimpleNamespace(mark=_Mark(), fixture=lambda *a, **k: (lambda f: f))
import mlx.core as mx
import tests.test_kernels_shim as t

cases = [
    (t.test_cuda_fp8_dequant_bit_exact, (mx.float16,)),
    (t.test_cuda_fp8_dequant_bit_exact, (mx.float32,)),
    (t.test_cuda_affine_dequant_bit_exact, (4,)),
    (t.test_cuda_affine_dequant_bit_exact, (8,)),
    (t.test_cuda_fp8_matvec_bit_exact, ()),
]
failed = 0
for fn, args in cases:
    try:
        fn(*args)
        print("PASS", fn.__name__, args)
    except Exception:
        failed += 1
        print("FAIL", fn.__name__, args)
        traceback.print_exc()
print(f"{len(cases) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF
  status=${PIPESTATUS[0]}
fi

# 4. the kernel benchmark (bytes/param + dequant GB/s, reference vs CUDA kernel)
log "bench/kernels.py"
"$PY" bench/kernels.py --only dequant --json "$RESULTS/kernels_dequant.json" 2>&1 | tee "$RESULTS/kernels_bench.txt"
"$PY" bench/kernels.py --only bytes 2>&1 | tail -n +2 | tee -a "$RESULTS/kernels_bench.txt"

log "done: cuda tests exit status $status"
exit "$status"
