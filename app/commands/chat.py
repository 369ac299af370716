"""`latent chat`: an interactive terminal chat with history.

Commands: `/reset` (forget the conversation), `/system TEXT` (set the system prompt and reset),
`/stats` (last reply's numbers and the model), `/quit`. Ctrl-C while a reply streams stops that
reply (the engine is cancelled, the partial reply stays in the history); Ctrl-D or /quit leaves.
Turn after turn the engine reuses the cached conversation prefix, so only new tokens are
prefilled. This module is a thin loop over `Engine.chat`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from app.commands.generate import add_model_options, format_stats, load_engine, params_from_args
from engine.errors import LatentError

HELP = "commands: /reset, /system TEXT, /stats, /quit (Ctrl-C stops a reply, Ctrl-D quits)"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal")
    add_model_options(p)
    p.set_defaults(func=run)


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    engine = load_engine(args)
    params = params_from_args(engine, args)
    system = args.system
    history: list[dict[str, str]] = []
    last = None
    info = engine.info()
    interactive = sys.stdin.isatty()
    print(
        f"{info.name} ({info.model_type}, {info.quantization or info.dtype}, "
        f"context {info.context_length}). {HELP}",
        file=sys.stderr,
    )
    while True:
        try:
            line = _read("> " if interactive else "")
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)", file=sys.stderr)
            continue
        if line is None:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            history.clear()
            print(
                f"(system prompt {'set' if system else 'cleared'}; conversation reset)",
                file=sys.stderr,
            )
            continue
        if line == "/stats":
            print(format_stats(last) if last else "(no reply yet)", file=sys.stderr)
            print(
                f"model: {info.name} at {info.path}; {info.n_params / 1e6:.0f}M parameters, "
                f"{info.weight_bytes / 2**20:.0f} MiB weights; prefix cache "
                f"{engine.prefix_cache.nbytes / 2**20:.1f} MiB",
                file=sys.stderr,
            )
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply: list[str] = []
        previous = signal.signal(signal.SIGINT, lambda *_: engine.cancel())
        try:
            for ev in engine.chat(messages, params):
                if ev.text:
                    reply.append(ev.text)
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                if ev.done:
                    last = ev.stats
        except LatentError as e:  # e.g. the conversation outgrew the context: say so, go on
            history.pop()
            print(f"error: {e} (try /reset)", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        if last is not None and last.finish_reason == "cancelled":
            print("(stopped)", file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(reply)})
