"""`latent pretrain --data DIR --preset NAME --out DIR`: train the teaching model from scratch.

Prints one line per evaluation (step, train loss, validation loss and perplexity) and ends with
the validation perplexity beside the unigram baseline's and the output folder, which
`latent chat --model DIR` and the app open like any model. `--set key=value` changes any design
or loop setting of the preset (e.g. `--set positional=alibi --set ffn=moe --set steps=300`).
Without `--data`, the bundled corpus (resources/corpus) is used. The work is
engine/train/pretrain.py's; Ctrl-C stops early and still saves.
"""

from __future__ import annotations

import argparse
import json
import math
import threading

from engine.errors import TrainingError


def register(subparsers) -> None:
    from engine.train.pretrain import PRESETS

    p = subparsers.add_parser(
        "pretrain", help="train the tiny teaching model and its tokenizer from scratch"
    )
    p.add_argument("--data", help="folder of .txt/.md documents (default: the bundled corpus)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--preset", default="nano", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument(
        "--byte-fallback", action="store_true", help="unseen characters become byte tokens, not UNK"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> int:
    from engine.train.pretrain import PretrainConfig, default_corpus, pretrain

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainingError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _value(value.strip())
    if args.steps:
        overrides["steps"] = args.steps
    config = PretrainConfig(
        data=args.data or str(default_corpus()),
        out=args.out,
        preset=args.preset,
        overrides=overrides,
        byte_fallback=args.byte_fallback,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    cancel = threading.Event()
    events = pretrain(config, cancel)
    last = None
    while True:
        try:
            ev = next(events)
        except StopIteration:
            break
        except KeyboardInterrupt:
            cancel.set()  # the generator saves what it has on its next step
            continue
        last = ev
        if ev.val_loss is not None and not ev.done:
            print(
                f"step {ev.step:>5}/{ev.total}  loss {ev.loss:.3f}  val {ev.val_loss:.3f} "
                f"(ppl {math.exp(ev.val_loss):.1f})  {ev.tokens_per_s:,.0f} tok/s",
                flush=True,
            )
    if last is None or not last.done:
        return 1
    print(
        f"validation perplexity {math.exp(last.val_loss):.2f} (best checkpoint); unigram baseline {last.unigram_ppl:.2f}"
    )
    print(f"saved to {last.out}")
    return 0
