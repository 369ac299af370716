"""`make bench`: every benchmark, appended to BENCHMARKS.md with date, machine and command.

    python bench/run_all.py [--runs 3] [--quick] [--no-write]

1. this machine's limits: copy bandwidth and fp32 matmul GFLOP/s (numpy), hence the decode
   ceiling per weight format (bytes of weights per token ÷ bandwidth);
2. bench/generate.py: ours (GGUF and fp32) vs mlx-lm (fp32, same weights; and its usual 4-bit
   `mlx_lm.convert -q` form, 16 new tokens) and llama.cpp (2 threads, where installed: `make
   bench` installs it): prefill tok/s, decode tok/s, TTFT, peak RSS, medians of alternating runs;
3. bench/prefix_reuse.py: turn-2 TTFT with a 2,000-token history vs a cold prompt;
4. bench/profile_decode.py: where one decoded token's milliseconds go;
5. every other `bench/*.py` script (other areas' benchmarks), its stdout included as is
   (`--skip-others` leaves them out).
`--quick` shrinks every size (a smoke run, not numbers to quote).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

OWN = {"run_all.py", "common.py", "generate.py", "prefix_reuse.py", "profile_decode.py"}


def _run_script(name: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(HERE / name), *args],
        capture_output=True,
        text=True,
        timeout=3600,
        cwd=ROOT,
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["failed"]
        return f"{name} failed: {tail[0]}"
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-others", action="store_true", help="only this file's own sections")
    ap.add_argument(
        "--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md"
    )
    args = ap.parse_args(argv)
    import generate

    from engine.defaults import ensure_default_model

    gguf = str(ensure_default_model(progress=lambda *a: print(*a, file=sys.stderr)))
    info = common.machine_info()
    copy = common.copy_bandwidth_gbs()
    gemm = common.matmul_gflops()
    prompt, new, runs = (64, 8, 1) if args.quick else (512, 128, args.runs)
    print(f"== generate: {prompt}-token prompt, {new} new tokens, {runs} runs", file=sys.stderr)
    res = generate.benchmark(gguf, runs, prompt, new)
    gen = generate.report(res, {"copy_gbs": copy})
    print("== prefix reuse", file=sys.stderr)
    hist = "512" if args.quick else "2000"
    prefix = _run_script(
        "prefix_reuse.py", "--history-tokens", hist, "--runs", "1" if args.quick else "2"
    )
    print("== decode profile", file=sys.stderr)
    prof = _run_script("profile_decode.py", "--iters", "5" if args.quick else "20")
    others = []
    if not args.skip_others:
        for script in sorted(HERE.glob("*.py")):
            if script.name in OWN or script.name.startswith("_"):
                continue
            print(f"== {script.name}", file=sys.stderr)
            extra = ("--quick",) if args.quick else ()
            others += [f"### bench/{script.name}", "", _run_script(script.name, *extra), ""]
    cmd = "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = info["load_avg"]
    text = "\n".join(
        [
            f"## {info['date']} — `{cmd.strip()}`",
            "",
            f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB, {info['os']}; "
            f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; "
            f"versions {info['versions']}; git {info['git']}.",
            f"Measured limits: copy bandwidth {copy:.1f} GB/s, numpy fp32 matmul {gemm:.0f} GFLOP/s.",
            "",
            gen,
            "",
            "Prompt reuse: " + prefix,
            "",
            "One decoded token (ours, GGUF, cache 512):",
            "",
            prof,
            "",
            *others,
        ]
    )
    print(text)
    if not args.no_write and not args.quick:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + text)
        print("appended to BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
