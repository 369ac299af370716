"""Build and load the CPU kernel extension (`_latent_cpu`), once per machine.

    python -m latent_kernels.cpu   # build now (make test does this), print where

The shared library goes to `<user cache>/latent-studio/kernels/<key>/`, where the key hashes
the C++ source, the MLX and nanobind versions and the Python ABI, so an upgrade rebuilds it.
A build is written to a temporary folder and renamed into place, so an interrupted build never
leaves a half-written library that a later run would load. A PyInstaller app carries a built
copy beside this file (packaging/build.py), which `load()` prefers.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

DISABLE_ENV = "LATENT_NO_CPU_KERNELS"
MODULE = "_latent_cpu"
SOURCE = Path(__file__).with_name("qmatmul.cpp")
HEADERS = [Path(__file__).with_name(n) for n in ("attention.h", "decode.h")]

_module = None
_error: str | None = None
_tried = False


def _versions() -> tuple[str, str]:
    import mlx.core as mx
    import nanobind

    return mx.__version__, nanobind.__version__


def _suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("latent-studio")) / "kernels"


def _key() -> str:
    mlx_v, nb_v = _versions()
    h = hashlib.sha256(SOURCE.read_bytes())
    for header in HEADERS:
        h.update(header.read_bytes())
    h.update(f"{mlx_v}|{nb_v}|{_suffix()}|{platform.machine()}".encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / _key() / f"{MODULE}{_suffix()}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_command(out: Path) -> list[str]:
    import mlx.core as mx
    import nanobind

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/clang++) on PATH")
    mlx_dir = Path(mx.__file__).parent  # mlx is a namespace package
    nb_dir = Path(nanobind.__file__).parent
    cmd = [
        cxx,
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-DNDEBUG",
        # share MLX's nanobind domain, so mx.array passes between the two modules
        "-DNB_DOMAIN=mlx",
        f"-I{mlx_dir / 'include'}",
        f"-I{nb_dir / 'include'}",
        f"-I{nb_dir / 'ext' / 'robin_map' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE),
        str(nb_dir / "src" / "nb_combined.cpp"),
        f"-L{mlx_dir / 'lib'}",
        "-lmlx",
        "-o",
        str(out),
    ]
    if sys.platform == "darwin":
        cmd += ["-undefined", "dynamic_lookup", f"-Wl,-rpath,{mlx_dir / 'lib'}"]
    else:
        cmd += [f"-Wl,-rpath,{mlx_dir / 'lib'}", "-pthread"]
    return cmd


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile the extension into the cache (if not already there); returns its path."""
    target = library_path()
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = compile_command(out)
        if verbose:
            print("==", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise RuntimeError("building the CPU kernels failed:\n" + "\n".join(tail))
        os.replace(out, target)
    return target


def _bundled() -> Path | None:
    p = Path(__file__).with_name(f"{MODULE}{_suffix()}")
    return p if p.is_file() else None


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _self_check(mod):
    """One small call against MLX's own op: a module built against another MLX/nanobind ABI
    fails here (not in the middle of a generation)."""
    import mlx.core as mx

    w, s, b = mx.quantize(mx.arange(64 * 32, dtype=mx.float32).reshape(64, 32) / 100, 32, 4)
    x = mx.ones((1, 32))
    got = mod.qmm_rows(x, w, s, b, 32, 4)
    want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=4)
    if not mx.allclose(got, want, rtol=1e-4, atol=1e-3).item():
        raise RuntimeError("the CPU kernels' self-check disagrees with mx.quantized_matmul")
    return mod


def load(build_if_missing: bool = True):
    """The kernel module, or None (see `load_error()`). Builds on first use when allowed."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get(DISABLE_ENV):
        _error = f"turned off by {DISABLE_ENV}"
        return None
    if sys.platform not in ("linux", "darwin"):
        _error = f"not built on {sys.platform}"
        return None
    try:
        path = _bundled() or library_path()
        if not path.is_file():
            if not build_if_missing:
                _error = f"not built yet ({path})"
                return None
            path = build()
        _module = _self_check(_import(path))
    except Exception as e:  # a missing compiler or a failed build must not stop the engine
        _error = str(e).splitlines()[0] if str(e) else type(e).__name__
        _module = None
    return _module


def load_error() -> str | None:
    """Why `load()` returned None (None when it did not)."""
    return _error


def main() -> int:
    try:
        path = build(verbose="-v" in sys.argv)
    except Exception as e:
        print(f"warning: {e}", file=sys.stderr)
        print("the engine will use MLX's own quantized ops on the CPU", file=sys.stderr)
        return 0  # not fatal: the engine falls back
    mod = _import(path)
    print(f"{path} ({mod.simd()}, {mod.num_threads()} threads)")
    return 0
