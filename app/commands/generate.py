"""`latent generate`: one prompt in, the reply streamed to stdout, stats to stderr.

`--json` prints one JSON object instead (text, token ids and counts, TTFT, prefill and decode
tok/s, peak memory, finish reason) for scripts. `--raw` skips the chat template. The model
defaults to the default model (fetched on first use). `--draft MODEL [--num-draft N]` decodes
speculatively with a small draft model of the same tokenizer (acceptance in the stats). Shared
option helpers for `latent chat` live here too. This module only parses arguments and formats
output; the work is `Engine`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine.errors import LatentError
from engine.sampling import SamplingParams


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        help="model folder, .gguf file or Hub repo id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temp", type=float, help="temperature (0 = greedy; default: the model's)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="random seed (same seed, same output)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system prompt")
    p.add_argument(
        "--hosts",
        metavar="FILE",
        help="split the model's layers over these hosts (see `latent hosts`)",
    )


def resolve_model(arg: str | None) -> str:
    if arg:
        return arg
    from engine.defaults import ensure_default_model

    return str(ensure_default_model(progress=lambda *a: print(*a, file=sys.stderr)))


def load_engine(args: argparse.Namespace):
    from engine.session import Engine

    if getattr(args, "hosts", None):  # pipeline-parallel (app/commands/hosts.py)
        from app.commands.hosts import pipeline_engine_or_exit

        return pipeline_engine_or_exit(resolve_model(args.model), args.hosts, args.adapter)
    engine = Engine()
    engine.load(resolve_model(args.model), args.adapter)
    return engine


def params_from_args(engine, args: argparse.Namespace) -> SamplingParams:
    p = engine.generation_defaults()
    changes: dict[str, Any] = {}
    for attr, field in (
        ("max_tokens", "max_tokens"),
        ("temp", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("repetition_penalty", "repetition_penalty"),
        ("seed", "seed"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            changes[field] = value
    if args.stop:
        changes["stop"] = list(args.stop)
    return p.replace(**changes)


def format_stats(st) -> str:
    cached = f" ({st.cached_tokens} cached)" if st.cached_tokens else ""
    fallback = " [fallback chat template]" if st.template_fallback else ""
    proposed = getattr(st, "draft_proposed", 0)
    draft = (
        f" | draft accepted {st.draft_accepted}/{proposed} ({st.draft_accepted / proposed:.0%})"
        if proposed
        else ""
    )
    return (
        f"prompt {st.prompt_tokens} tokens{cached}, generated {st.generated_tokens} "
        f"({st.finish_reason}) | TTFT {st.ttft_s:.2f} s | prefill {st.prefill_tps:.1f} tok/s "
        f"| decode {st.decode_tps:.1f} tok/s{draft} | peak {st.peak_memory_bytes / 2**20:.0f} MiB"
        f"{fallback}"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a reply to one prompt")
    add_model_options(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument(
        "--draft",
        metavar="MODEL",
        help="speculative decoding: a small draft model with the same tokenizer (folder, .gguf, repo)",
    )
    p.add_argument(
        "--num-draft",
        type=int,
        metavar="N",
        help="tokens the draft proposes per target pass (default 4)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if getattr(args, "draft", None) and getattr(args, "hosts", None):
        raise LatentError("--draft is not supported with --hosts")
    if getattr(args, "num_draft", None) is not None and not getattr(args, "draft", None):
        raise LatentError("--num-draft needs --draft MODEL")
    engine = load_engine(args)
    if getattr(args, "draft", None):
        engine.load_draft(args.draft, num_draft=args.num_draft)
    params = params_from_args(engine, args)
    if args.raw:
        text = f"{args.system}\n\n{prompt}" if args.system else prompt
        stream = engine.complete(text, params)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        stream = engine.chat(messages, params)
    parts: list[str] = []
    tokens: list[int] = []
    stats = None
    for ev in stream:
        if ev.token_id is not None:
            tokens.append(ev.token_id)
        if ev.text:
            parts.append(ev.text)
            if not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        if ev.done:
            stats = ev.stats
    if args.json:
        info = engine.info()
        out = {"text": "".join(parts), "tokens": tokens, "model": info.name if info else None}
        out.update(stats.as_dict() if stats else {})
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        if stats is not None:
            print(format_stats(stats), file=sys.stderr)
    return 0
