"""`latent bench`: run the benchmarks of a source checkout (bench/run_all.py, as `make bench`).

The benchmarks live beside the source (bench/), not in the installed package; from an install
without them this says so in one line. Results are appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from engine.errors import LatentError


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks (appends to BENCHMARKS.md)")
    p.add_argument("--runs", type=int, default=3, help="alternating rounds per setup")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, no file written")
    p.add_argument("--skip-others", action="store_true", help="generation benchmarks only")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "bench" / "run_all.py"
    if not script.is_file():
        raise LatentError(f"{script}: not found; the benchmarks ship with the source tree only")
    cmd = [sys.executable, str(script), "--runs", str(args.runs)]
    cmd += [f for f, on in (("--quick", args.quick), ("--skip-others", args.skip_others),
                            ("--no-write", args.no_write)) if on]  # fmt: skip
    return subprocess.call(cmd, cwd=script.parent.parent)
