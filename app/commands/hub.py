"""`latent search`, `latent download`, `latent models`, `latent rm`: the Hub and the library
from the terminal.

`download` runs the same `DownloadManager` as the app (state in `<data_dir>/downloads`), draws
a progress bar on stderr, prints the model's folder on stdout, and on Ctrl-C pauses: running
the same command again resumes from the partial file. This module only parses arguments and
formats output; the work is `engine.hub`'s.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from engine.errors import DownloadError, LatentError


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="search the Hugging Face Hub for models")
    p.add_argument("query", nargs="?", default="")
    p.add_argument(
        "--format",
        action="append",
        choices=("gguf", "mlx", "safetensors"),
        help="only repos with this format (repeatable)",
    )
    p.add_argument("--sort", default="downloads", choices=("downloads", "likes", "updated"))
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--min-params", help="e.g. 500M")
    p.add_argument("--max-params", help="e.g. 8B")
    p.add_argument("--task", default="text-generation", help="pipeline tag ('any' for all)")
    p.set_defaults(func=run_search)

    p = subparsers.add_parser("download", help="download a model from the Hub (resumable)")
    p.add_argument("repo")
    p.add_argument("--include", action="append", help="only files matching this glob (repeatable)")
    p.add_argument("--variant", help="one variant by name, as `latent download REPO --list` shows")
    p.add_argument(
        "--list", action="store_true", help="list the repo's variants with a memory-fit check"
    )
    p.add_argument("--context", type=int, default=4096, help="context length for the fit check")
    p.add_argument("--revision", default="main")
    p.add_argument("--dir", help="download into this folder instead of the Hugging Face cache")
    p.set_defaults(func=run_download)

    p = subparsers.add_parser("models", help="list models on this machine")
    p.add_argument("--dir", action="append", default=[], help="also look in this folder")
    p.set_defaults(func=run_models)

    p = subparsers.add_parser("rm", help="delete a model from this machine")
    p.add_argument("model", help="repo id (HF cache), path, or name from `latent models`")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    p.set_defaults(func=run_rm)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def parse_count(text: str | None) -> int | None:
    if not text:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise LatentError(f"{text!r}: not a parameter count (e.g. 500M, 8B)")
    return int(
        float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    )


def run_search(args: argparse.Namespace) -> int:
    from engine.hub import search_models

    results = search_models(
        args.query,
        formats=args.format,
        sort=args.sort,
        limit=args.limit,
        min_params=parse_count(args.min_params),
        max_params=parse_count(args.max_params),
        task=None if args.task == "any" else args.task,
    )
    if not results:
        print("no models found", file=sys.stderr)
        return 0
    width = max(len(r.repo_id) for r in results)
    print(f"{'MODEL':<{width}}  {'FORMATS':<18} {'PARAMS':>7} {'DOWNLOADS':>10} {'LIKES':>6}")
    for r in results:
        fmts = ",".join(r.formats) + (" gated" if r.gated else "")
        print(
            f"{r.repo_id:<{width}}  {fmts:<18} {human_count(r.n_params):>7} {r.downloads:>10} {r.likes:>6}"
        )
    return 0


def _bar(ev, width: int = 28) -> str:
    frac = ev.bytes_done / ev.bytes_total if ev.bytes_total else 0.0
    filled = int(frac * width)
    eta = f"ETA {ev.eta_s:.0f}s" if ev.eta_s is not None else ""
    speed = f"{human_bytes(ev.speed_bps)}/s" if ev.speed_bps else ""
    name = (ev.file or "")[-30:]
    return (
        f"\r[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
        f"{human_bytes(ev.bytes_done)}/{human_bytes(ev.bytes_total)} {speed} {eta} {name}\x1b[K"
    )


def run_download(args: argparse.Namespace) -> int:
    from engine.hub import DownloadManager, list_variants
    from engine.paths import data_dir

    include = args.include
    if args.list or args.variant:
        variants = list_variants(args.repo, revision=args.revision, context=args.context)
        if args.list:
            print(f"{'VARIANT':<24} {'FORMAT':<12} {'DOWNLOAD':>10} {'MEMORY':>10}  FIT")
            for v in variants:
                print(
                    f"{v.name:<24} {v.format:<12} {human_bytes(v.bytes):>10} "
                    f"{human_bytes(v.estimate_bytes):>10}  {v.fit}"
                )
            return 0
        chosen = [v for v in variants if v.name.lower() == args.variant.lower()]
        if not chosen:
            names = ", ".join(v.name for v in variants) or "none"
            raise DownloadError(f"{args.repo}: no variant {args.variant!r} (variants: {names})")
        include = (include or []) + chosen[0].files

    try:
        manager = DownloadManager(data_dir() / "downloads")
    except DownloadError:  # the app has the shared queue open: use the command line's own
        manager = DownloadManager(data_dir() / "downloads-cli")
    tty = sys.stderr.isatty()
    last = [0.0]

    def show(ev) -> None:
        now = time.monotonic()
        if ev.kind == "progress" and (tty or now - last[0] > 2.0):
            last[0] = now
            sys.stderr.write(
                _bar(ev) if tty else _bar(ev).lstrip("\r").replace("\x1b[K", "") + "\n"
            )
            sys.stderr.flush()

    manager.subscribe(show)
    job_id = manager.enqueue(args.repo, include=include, revision=args.revision, local_dir=args.dir)
    try:
        job = manager.wait(job_id)
    except KeyboardInterrupt:
        manager.pause(job_id)
        job = manager.wait(job_id, timeout=10)
        manager.close()
        print(
            f"\npaused at {human_bytes(job.bytes_done)}; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    manager.close()
    if tty:
        sys.stderr.write("\n")
    if job.status != "done":
        raise DownloadError(job.error or f"{args.repo}: download {job.status}")
    print(job.path)
    return 0


def run_models(args: argparse.Namespace) -> int:
    from engine.hub import local_models

    models = local_models(extra_dirs=args.dir)
    if not models:
        print(
            "no models yet: try `latent search QUERY` and `latent download REPO`", file=sys.stderr
        )
        return 0
    width = max(len(m.name) for m in models)
    print(
        f"{'MODEL':<{width}}  {'FORMAT':<11} {'SIZE':>9} {'FAMILY':<12} {'CONTEXT':>7}  {'SOURCE':<10} PATH"
    )
    for m in models:
        print(
            f"{m.name:<{width}}  {m.format:<11} {human_bytes(m.size_bytes):>9} {m.family or '?':<12} "
            f"{m.context_length or '?':>7}  {m.source:<10} {m.path}"
        )
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from engine.hub import delete_model

    if not args.yes and sys.stdin.isatty():
        answer = input(f"delete {args.model}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    freed = delete_model(args.model)
    print(
        f"deleted {args.model}: {human_bytes(freed)} freed"
        if freed
        else f"forgot {args.model} (imported files are left where they are)"
    )
    return 0
