"""Shared benchmark helpers: this machine's description and its measured limits.

`machine_info()` names the CPU, cores, memory and library versions; `copy_bandwidth_gbs()`
and `matmul_gflops()` measure (with numpy) the two numbers that bound decoding (bytes of
weights per token ÷ bandwidth) and prefill (FLOPs ÷ matmul throughput). `median` and
`fmt_ratio` format results. No engine code here.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("mlx", "mlx_lm", "numpy", "llama_cpp"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-") if mod != "llama_cpp" else "llama-cpp-python")
        except Exception:
            pass
    return out


def machine_info() -> dict[str, object]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "mem_gib": round(mem_total_gib(), 1),
        "os": platform.platform(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions(),
        "git": _git_rev(),
    }


def _git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        return "?"


def copy_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a large numpy copy, best of `repeats`."""
    src = np.ones(mb * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def read_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Bytes read per second by a numpy sum over a large array, best of `repeats`."""
    src = np.ones(mb * 2**20 // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best / 1e9


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """numpy fp32 n×n×n matmul throughput (its BLAS), best of `repeats`."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a worker would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def fmt_ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"
