"""`latent serve`: the OpenAI-compatible API on 127.0.0.1 (see app/server.py)."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model through an OpenAI-compatible HTTP API")
    p.add_argument(
        "--model", help="model folder, .gguf file or Hub repo id (default: the default model)"
    )
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LATENT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LATENT_API_KEY)",
    )
    p.add_argument(
        "--hosts",
        metavar="FILE",
        help="split the model's layers over these hosts (see `latent hosts`)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from app.server import serve
    from engine.defaults import ensure_default_model
    from engine.session import Engine

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model = args.model or str(ensure_default_model(progress=log))
    if args.hosts:  # pipeline-parallel: rank 0 serves, the other hosts run their layers
        from app.commands.hosts import pipeline_engine_or_exit

        engine = pipeline_engine_or_exit(model, args.hosts, args.adapter)
        info = engine.info()
    else:
        engine = Engine()
        info = engine.load(model, adapter=args.adapter)
    serve(engine, info.name, host=args.host, port=args.port, api_key=args.api_key, log=log)
    return 0
