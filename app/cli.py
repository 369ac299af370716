"""The `latent` command. No argument opens the desktop app; subcommands are the terminal tools.

Each subcommand lives in `app/commands/<name>.py` with `register(subparsers)` that adds its
parser and sets `func(args) -> int`. A `LatentError` is printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "generate",
    "chat",
    "search",
    "download",
    "models",
    "rm",
    "finetune",
    "pretrain",
    "quantize",
    "inspect",
    "serve",
    "bench",
    "hosts",
)


def build_parser() -> argparse.ArgumentParser:
    from app import __version__

    parser = argparse.ArgumentParser(prog="latent", description="Latent Studio: local LLMs.")
    parser.add_argument("--version", action="version", version=f"latent-studio {__version__}")
    parser.add_argument(
        "--smoke-test", action="store_true", help="open the app offscreen, answer one prompt, exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name in COMMANDS:
        module_name = {"download": "hub", "search": "hub", "models": "hub", "rm": "hub"}.get(
            name, name
        )
        if module_name in seen:
            continue
        try:
            module = importlib.import_module(f"app.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"app.commands.{module_name}":
                continue  # that front end has not landed
            raise
        seen.add(module_name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line: re-exec once with OpenBLAS preloaded (engine/blas.py)
        from engine.blas import maybe_reexec_with_openblas

        maybe_reexec_with_openblas()
    from engine.errors import LatentError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            from app.gui.main import run_app

            return run_app(smoke_test=args.smoke_test)
        return int(args.func(args) or 0)
    except LatentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
