"""Speculative decoding benchmark: plain greedy decode vs draft-and-verify, same target.

    python bench/speculative.py [--model GGUF] [--runs 2] [--new-tokens 64]
                                [--num-draft 2 3 4 5 6] [--targets fp32 gguf]
                                [--drafts gguf q4g64] [--quick]

Target `fp32`: SmolLM2-135M-Instruct as an fp32 safetensors folder dequantized from the GGUF
(bench/generate.py's `write_fp32_folder`); target `gguf`: the GGUF itself. Drafts: `gguf`, the
Q4_1 GGUF: the fp32 target's weights are its exact dequantization, so the two differ only by
rounding in the matmuls and agree almost always; `q8g32` and `q4g64`: the fp32 weights
re-quantized to MLX affine 8-bit (groups of 32) and 4-bit (groups of 64), copies that are not
the target (teacher-forced top-1 agreement with it here: ~98% and ~60%).
All in one process: per prompt and round, plain and every num_draft run back to back in an
order that alternates between rounds (the machine is shared: only ratios within one run mean
much). Each run decodes exactly `new-tokens` greedy tokens (EOS does not stop it) through
`engine.generate.generate_step` / `engine.speculative.speculative_generate_step`.

Decode tok/s = tokens after the first yield ÷ time after it (a speculative round hands out its
tokens together, so the tokens of the first round are excluded like plain's first token).
Also reported: acceptance (accepted ÷ proposed draft tokens), mean tokens per target pass, the
draft's own plain decode speed, and whether the tokens equal plain greedy's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

QUESTIONS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a robot learning to paint.",
    "What are the main differences between Python lists and tuples?",
]


def chat_prompts(tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}])
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def timed(steps, n: int, counts=None) -> tuple[list[int], float]:
    """Tokens and decode tok/s of a generator of `(token, logprobs)` (n tokens exactly)."""
    tokens: list[int] = []
    t_first = None
    for t, _ in steps:
        tokens.append(t)
        if t_first is None:
            t_first = time.perf_counter()
        if len(tokens) >= n:
            break
    t_end = time.perf_counter()
    first = max(1, counts.first_emitted) if counts is not None else 1  # came with the first
    return tokens, (len(tokens) - first) / max(t_end - t_first, 1e-9)


def run_plain(model, ids, n):
    from engine.generate import generate_step

    return timed(generate_step(model, ids, model.make_cache(), max_tokens=n), n) + (None,)


def run_spec(model, draft, ids, n, k):
    from engine.speculative import DraftCounts, speculative_generate_step

    counts = DraftCounts()
    steps = speculative_generate_step(
        model, draft, ids, model.make_cache(), draft.make_cache(),
        num_draft=k, max_tokens=n, counts=counts,
    )  # fmt: skip
    tokens, tps = timed(steps, n, counts)
    return tokens, tps, counts


REQUANT = {"q8g32": (32, 8), "q4g64": (64, 4)}  # draft name -> (group size, bits)


def requantized(folder: Path, gguf: str, group_size: int, bits: int):
    """The fp32 folder re-quantized to MLX affine `bits` in groups of `group_size`."""
    import mlx.core as mx
    import mlx.nn as nn

    import engine
    from engine.tokenizer import Tokenizer

    loaded = engine.load(str(folder))
    nn.quantize(loaded.model, group_size=group_size, bits=bits)
    mx.eval(loaded.model.parameters())
    loaded.tokenizer = Tokenizer.from_path(gguf)
    return loaded


def benchmark(gguf: str, targets, drafts, num_drafts, runs: int, n_new: int) -> dict:
    import generate  # bench/generate.py: the fp32 folder helper

    import engine
    from engine.speculative import check_draft
    from engine.tokenizer import Tokenizer

    folder = generate.write_fp32_folder(gguf, Path(tempfile.mkdtemp(prefix="latent-spec-")))
    draft_models = {}
    if "gguf" in drafts:
        draft_models["gguf"] = engine.load(gguf)
    for name, (group, bits) in REQUANT.items():
        if name in drafts:
            draft_models[name] = requantized(folder, gguf, group, bits)
    tokenizer = Tokenizer.from_path(gguf)
    prompts = chat_prompts(tokenizer)
    loaded = {}
    if "fp32" in targets:
        loaded["fp32"] = engine.load(str(folder))
        loaded["fp32"].tokenizer = tokenizer  # the folder holds weights only
    if "gguf" in targets:
        loaded["gguf"] = engine.load(gguf)
    for t in loaded.values():
        for d in draft_models.values():
            check_draft(t, d)
    # Warm-up (first calls allocate and pick kernels), not timed.
    for t in loaded.values():
        run_plain(t.model, prompts[0], 4)
        for d in draft_models.values():
            run_spec(t.model, d.model, prompts[0], 6, 2)

    results: dict = {}
    for tname, target in loaded.items():
        setups = ["plain"] + [f"{d} k={k}" for d in draft_models for k in num_drafts]
        rows = {s: {"tps": [], "ratio": [], "acc": [], "prop": [], "rounds": [], "same": True}
                for s in setups}  # fmt: skip
        draft_tps: dict[str, list[float]] = {d: [] for d in draft_models}
        for r in range(runs):
            for pi, ids in enumerate(prompts):
                order = setups if (r + pi) % 2 == 0 else list(reversed(setups))
                got = {}
                for s in order:
                    if s == "plain":
                        got[s] = run_plain(target.model, ids, n_new)
                    else:
                        dname, k = s.split(" k=")
                        d = draft_models[dname].model
                        got[s] = run_spec(target.model, d, ids, n_new, int(k))
                for dname, d in draft_models.items():
                    draft_tps[dname].append(run_plain(d.model, ids, n_new)[1])
                ref, base = got["plain"][0], got["plain"][1]
                for s, (tokens, tps, counts) in got.items():
                    row = rows[s]
                    row["tps"].append(tps)
                    row["ratio"].append(tps / base)
                    row["same"] &= tokens == ref
                    if counts is not None:
                        row["acc"].append(counts.accepted)
                        row["prop"].append(counts.proposed)
                        row["rounds"].append(counts.rounds)
                print(f"  {tname} round {r + 1} prompt {pi + 1}: " + ", ".join(
                    f"{s} {got[s][1]:.1f}" for s in setups), file=sys.stderr, flush=True)  # fmt: skip
        results[tname] = {
            "rows": rows,
            "draft_tps": {d: common.median(v) for d, v in draft_tps.items()},
        }
    return {
        "results": results,
        "runs": runs,
        "new_tokens": n_new,
        "prompt_tokens": [len(p) for p in prompts],
    }


def report(res: dict) -> str:
    lines = [
        f"{len(res['prompt_tokens'])} chat prompts ({', '.join(map(str, res['prompt_tokens']))} "
        f"tokens), {res['new_tokens']} new tokens greedy, {res['runs']} rounds; medians over "
        "prompts x rounds; ratio = speculative / plain decode tok/s in the same round",
    ]
    for tname, r in res["results"].items():
        alone = ", ".join(f"{d} {v:.1f}" for d, v in r["draft_tps"].items())
        lines += [
            "",
            f"Target {tname} (drafts alone decode at tok/s: {alone}):",
            "",
            "| draft, num_draft | decode tok/s | ratio to plain | acceptance | tokens per target "
            "pass | tokens = plain greedy |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for s, row in r["rows"].items():
            if row["prop"]:
                acc = sum(row["acc"]) / max(sum(row["prop"]), 1)
                per_pass = (len(row["tps"]) * res["new_tokens"]) / max(sum(row["rounds"]), 1)
                acc_s, pass_s = f"{acc:.0%}", f"{per_pass:.2f}"
            else:
                acc_s, pass_s = "", "1"
            lines.append(
                f"| {s} | {common.median(row['tps']):.2f} | {common.median(row['ratio']):.2f}x "
                f"| {acc_s} | {pass_s} | {'yes' if row['same'] else '**no**'} |"
            )
    return "\n".join(lines)


DRAFTS = ["gguf", *REQUANT]


def main(argv: list[str] | None = None) -> int:
    from engine.blas import maybe_reexec_with_openblas

    # as the app, the CLI and bench/generate.py run: a dense target's verification pass is a
    # few-row GEMM, ~20x slower on MLX's reference BLAS than on OpenBLAS here
    maybe_reexec_with_openblas()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, nargs="*", default=[2, 3, 4, 5, 6])
    ap.add_argument("--targets", nargs="*", default=["fp32"], choices=["fp32", "gguf"])
    ap.add_argument("--drafts", nargs="*", default=DRAFTS, choices=DRAFTS)
    ap.add_argument("--quick", action="store_true", help="a smoke run, not numbers to quote")
    args = ap.parse_args(argv)
    from engine.defaults import ensure_default_model

    gguf = args.model or str(ensure_default_model(progress=lambda *a: None))
    if args.quick:
        args.runs, args.new_tokens, args.num_draft = 1, 12, [3]
    info = common.machine_info()
    res = benchmark(gguf, args.targets, args.drafts, args.num_draft, args.runs, args.new_tokens)
    load = info["load_avg"]
    print(f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; git {info['git']}")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
