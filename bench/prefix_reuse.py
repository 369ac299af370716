"""Turn-2 time to first token with a long history: prompt-prefix reuse vs a cold prompt.

    python bench/prefix_reuse.py [--model GGUF] [--history-tokens 2000] [--runs 3]

A conversation whose history is ~`history-tokens` long gets one more user message. Cold: a
fresh prefix cache prefills the whole prompt. Warm: the engine has just answered the previous
turn, so only the new tokens (the reply's template tail and the new message) are prefilled.
Target (issue 11): warm TTFT <= 20% of cold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.blas import maybe_reexec_with_openblas  # noqa: E402

PARAGRAPH = (
    "Our garden has three raised beds: tomatoes and basil in the first, beans climbing a "
    "trellis in the second, and a mix of lettuce, radishes and carrots in the third. "
)


def _history(engine, n_tokens: int) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    i = 0
    while engine.count_tokens(msgs + [{"role": "user", "content": "x"}]) < n_tokens:
        msgs.append({"role": "user", "content": f"Note {i}: " + PARAGRAPH * 2})
        msgs.append({"role": "assistant", "content": "Noted. " + PARAGRAPH})
        i += 1
    return msgs


def measure(model: str, history_tokens: int, runs: int) -> dict:
    import statistics

    from engine.sampling import SamplingParams
    from engine.session import Engine

    eng = Engine()
    eng.load(model)
    p = SamplingParams(temperature=0.0, max_tokens=1)
    hist = _history(eng, history_tokens)
    turn1 = hist + [{"role": "user", "content": "What grows in the second bed?"}]
    cold, warm, cached, total = [], [], [], 0
    for r in range(runs):
        eng.prefix_cache.clear()
        # warm: answer turn 1 (fills the cache), then time turn 2
        reply = "".join(
            e.text for e in eng.chat(turn1, SamplingParams(temperature=0.0, max_tokens=8))
        )
        turn2 = turn1 + [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"And in the third bed? ({r})"},
        ]
        st = list(eng.chat(turn2, p))[-1].stats
        warm.append(st.ttft_s)
        cached.append(st.cached_tokens)
        total = st.prompt_tokens
        eng.prefix_cache.clear()
        cold.append(list(eng.chat(turn2, p))[-1].stats.ttft_s)
    c, w = statistics.median(cold), statistics.median(warm)
    return {
        "prompt_tokens": total,
        "cached_tokens": int(statistics.median(cached)),
        "cold_ttft_s": c,
        "warm_ttft_s": w,
        "ratio": w / c,
    }


def report(res: dict) -> str:
    return (
        f"turn 2 with a {res['prompt_tokens']}-token prompt ({res['cached_tokens']} reused): "
        f"cold TTFT {res['cold_ttft_s']:.2f} s, warm TTFT {res['warm_ttft_s']:.3f} s "
        f"= {100 * res['ratio']:.1f}% of cold (target <= 20%)"
    )


def main(argv: list[str] | None = None) -> int:
    maybe_reexec_with_openblas()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--history-tokens", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    from engine.defaults import ensure_default_model

    model = args.model or str(ensure_default_model(progress=lambda *a: None))
    print(report(measure(model, args.history_tokens, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
