"""Generation benchmark: ours vs mlx-lm (and llama.cpp where installed) on the same weights.

    python bench/generate.py [--model GGUF] [--runs 3] [--prompt-tokens 512] [--new-tokens 128]
                             [--q4-new-tokens 16] [--q4-runs 1] [--q4-dtype bfloat16]
                             [--setups NAME ...]

Setups (each run in a fresh subprocess, so peak RSS is per engine; rounds alternate setups):
- `ours-gguf`: our engine on the GGUF file as shipped (Q4_1 + Q8_0 tensors kept quantized);
- `ours-fp32`: our engine on an fp32 safetensors folder dequantized from the same GGUF;
- `mlx-lm-fp32`: mlx-lm on that same folder (its default dtype for fp32 weights);
- `mlx-lm-fp32-refblas` (`--with-refblas`): mlx-lm as a user runs it, on MLX's bundled BLAS;
- `mlx-lm-q4`: mlx-lm on the 4-bit (group 64) folder `mlx_lm.convert -q` makes from that fp32
  folder, scales and activations in `--q4-dtype` (bfloat16: what converting SmolLM2's bf16
  Hugging Face checkpoint gives, mlx-lm's usual form of it); converted once into the user
  cache folder. It takes seconds per token on MLX's CPU backend, so it decodes only
  `--q4-new-tokens` tokens (same prompt) and joins only the first `--q4-runs` rounds (its
  512-token prefill alone takes minutes);
- `llama.cpp`: llama-cpp-python on the GGUF with 2 threads, only where `llama_cpp` is
  importable (`make bench` installs it).
Every setup gets the same prompt ids and greedy decoding of exactly `new-tokens` tokens (EOS
does not stop it), after a short warm-up generation in the same process. OpenBLAS is
preloaded for every MLX process alike (see engine/blas.py); `--no-openblas` runs them all on
MLX's bundled reference BLAS instead.
The worker mode (`--worker SETUP`) is what the subprocesses run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

PARAGRAPH = (
    "The history of computing is a story of abstractions layered on one another. Early "
    "machines were programmed by rewiring panels; stored programs let instructions live in "
    "memory beside data; assemblers named the numbers; compilers let people write "
    "arithmetic as they would on paper; operating systems shared one machine among many "
    "users. Each layer hid details below it and exposed new possibilities above. "
)


def prompt_ids(model_path: str, n: int) -> list[int]:
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_path(model_path)
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PARAGRAPH, add_special_tokens=False)
    return ids[:n]


# --- workers (run in a subprocess each) ------------------------------------------------------


def _time_stream(steps, n_prompt: int, n_new: int, t0: float) -> dict:
    n = 0
    t_first = None
    for _ in steps:
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n >= n_new:
            break
    t_end = time.perf_counter()
    ttft = t_first - t0
    return {
        "ttft_s": ttft,
        "prefill_tps": n_prompt / ttft,
        "decode_tps": (n - 1) / (t_end - t_first),
        "tokens": n,
    }


def worker_ours(path: str, ids: list[int], n_new: int) -> dict:
    import mlx.core as mx

    import engine
    from engine.generate import generate_step

    loaded = engine.load(path)
    model = loaded.model
    # Warm-up: first calls compile/allocate; not what a user waits for on every message.
    for _ in generate_step(model, ids[:16], model.make_cache(), max_tokens=4):
        pass
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    steps = (t for t, _ in generate_step(model, ids, model.make_cache(), max_tokens=n_new))
    out = _time_stream(steps, len(ids), n_new, t0)
    out["weight_bytes"] = loaded.info.weight_bytes
    return out


def worker_mlx_lm(path: str, ids: list[int], n_new: int) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    sampler = lambda x: mx.argmax(x, axis=-1)  # noqa: E731 - greedy, as ours
    for _ in generate_step(mx.array(ids[:16]), model, max_tokens=4, sampler=sampler):
        pass
    t0 = time.perf_counter()
    steps = generate_step(mx.array(ids), model, max_tokens=n_new, sampler=sampler)
    out = _time_stream(steps, len(ids), n_new, t0)
    out["weight_bytes"] = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return out


LLAMA_THREADS = 2  # the comparison: llama.cpp on 2 threads, prefill and decode alike


def worker_llama_cpp(path: str, ids: list[int], n_new: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=2048,
        n_batch=512,  # a 512-token prompt is one batch, as ours and mlx-lm prefill it at once
        n_threads=LLAMA_THREADS,
        n_threads_batch=LLAMA_THREADS,
        verbose=False,
    )
    # `generate` is an endless greedy stream (temp 0 = greedy sampler; EOS only stops
    # `create_completion`), yielding each token once it is sampled, like the other workers.
    for i, _ in enumerate(llm.generate(ids[:16], top_k=1, temp=0.0)):
        if i >= 3:
            break
    # n_tokens = 0: the next generate neither reuses the warm-up's KV prefix nor keeps it.
    llm.reset()
    t0 = time.perf_counter()
    steps = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
    out = _time_stream(steps, len(ids), n_new, t0)
    out["weight_bytes"] = Path(path).stat().st_size
    return out


WORKERS = {"ours": worker_ours, "mlx-lm": worker_mlx_lm, "llama.cpp": worker_llama_cpp}


# --- fp32 folder from the GGUF ---------------------------------------------------------------


def write_fp32_folder(gguf: str, folder: Path) -> Path:
    """Dequantize our loaded GGUF to an fp32 HF-layout folder both engines can load."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import engine
    from engine.blas import dequantize_model

    loaded = engine.load(gguf)
    dequantize_model(loaded.model)
    weights = dict(tree_flatten(loaded.model.parameters()))
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    cfg = loaded.config
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        # Top level, where mlx-lm reads it (it ignores `rope_parameters`; FACTS.md).
        "rope_theta": cfg["rope_theta"],
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "vocab_size": cfg["vocab_size"],
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


Q4_DTYPE = "bfloat16"  # SmolLM2's checkpoint dtype: what `mlx_lm.convert -q` keeps from it
Q4_GROUP, Q4_BITS = 64, 4  # mlx_lm.convert's defaults


def mlx_q4_folder(gguf: str, fp32: Path, dtype: str = Q4_DTYPE) -> Path:
    """`mlx_lm.convert -q` of the fp32 folder, made once per GGUF into the user cache folder."""
    from platformdirs import user_cache_dir

    src = Path(gguf)
    st = src.stat()
    name = f"{src.stem}-{st.st_size}-{int(st.st_mtime)}-mlx-q{Q4_BITS}g{Q4_GROUP}-{dtype}"
    out = Path(user_cache_dir("latent-studio", appauthor=False)) / "bench" / name
    if (out / "config.json").is_file():
        return out
    # mlx_lm.convert loads a tokenizer from the folder: give it the GGUF's (transformers reads
    # it), beside links to the fp32 weights; the fp32 folder itself stays weights-only, as the
    # other setups load it. Both steps run in subprocesses outside the repository, whose
    # `kernels/` folder would shadow the `kernels` package transformers imports.
    stage = fp32.parent / "fp32-with-tokenizer"
    stage.mkdir(exist_ok=True)
    for f in fp32.iterdir():
        (stage / f.name).symlink_to(f.resolve())
    save_tok = (
        "import sys; from transformers import AutoTokenizer; "
        "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2])"
        ".save_pretrained(sys.argv[3])"
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-c", save_tok, str(src.parent), src.name, str(stage)],
        [
            sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(stage),
            "--mlx-path", str(partial), "-q", "--q-group-size", str(Q4_GROUP),
            "--q-bits", str(Q4_BITS), "--dtype", dtype,
        ],
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH")}
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=fp32.parent, env=env)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
            raise RuntimeError(f"mlx-lm-q4: {' '.join(cmd[1:4])} failed: {tail}")
    partial.rename(out)
    return out


# --- driver ----------------------------------------------------------------------------------


def run_worker(setup: str, path: str, ids_file: str, n_new: int, openblas: bool) -> dict:
    env = dict(os.environ)
    for k in ("LD_PRELOAD", "LATENT_OPENBLAS_REEXEC"):
        env.pop(k, None)
    if openblas:
        from engine.blas import openblas_path

        lib = openblas_path()
        if lib:
            env["LD_PRELOAD"] = lib
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", setup, "--path", path,
        "--ids-file", ids_file, "--new-tokens", str(n_new),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


SETUPS = ("ours-gguf", "ours-fp32", "mlx-lm-fp32", "mlx-lm-fp32-refblas", "mlx-lm-q4", "llama.cpp")


def benchmark(
    gguf: str,
    runs: int,
    n_prompt: int,
    n_new: int,
    openblas: bool = True,
    setups=None,
    refblas: bool = False,
    q4_new: int = 16,
    q4_dtype: str = Q4_DTYPE,
    q4_runs: int = 1,
) -> dict:
    # the fp32 folder (~540 MB) goes when the run does; the 4-bit one is cached for reuse
    with tempfile.TemporaryDirectory(prefix="latent-bench-") as d:
        tmp = Path(d)
        fp32 = write_fp32_folder(gguf, tmp / "fp32")
        ids = prompt_ids(gguf, n_prompt)
        ids_file = tmp / "ids.json"
        ids_file.write_text(json.dumps(ids))
        wanted = set(setups) if setups else set(SETUPS) - {"mlx-lm-fp32-refblas"}
        if refblas:  # mlx-lm exactly as a user runs it: MLX's bundled reference BLAS
            wanted.add("mlx-lm-fp32-refblas")
        if not llama_cpp_available():
            wanted.discard("llama.cpp")
        q4 = ""
        if "mlx-lm-q4" in wanted:
            print("  mlx-lm-q4: converting (once, cached)", file=sys.stderr, flush=True)
            q4 = str(mlx_q4_folder(gguf, fp32, q4_dtype))
        # name -> (worker, weights, OpenBLAS preloaded, new tokens)
        plan = {
            "ours-gguf": ("ours", gguf, openblas, n_new),
            "ours-fp32": ("ours", str(fp32), openblas, n_new),
            "mlx-lm-fp32": ("mlx-lm", str(fp32), openblas, n_new),
            "mlx-lm-fp32-refblas": ("mlx-lm", str(fp32), False, n_new),
            "mlx-lm-q4": ("mlx-lm", q4, openblas, min(n_new, q4_new)),
            "llama.cpp": ("llama.cpp", gguf, False, n_new),
        }
        plan = {k: v for k, v in plan.items() if k in wanted}
        results: dict[str, list[dict]] = {k: [] for k in plan}
        for r in range(runs):
            order = list(plan) if r % 2 == 0 else list(reversed(plan))  # alternate
            for name in order:
                if name == "mlx-lm-q4" and r >= q4_runs:
                    continue
                kind, path, blas, n = plan[name]
                res = run_worker(kind, path, str(ids_file), n, blas)
                print(f"  round {r + 1} {name}: {res}", file=sys.stderr, flush=True)
                results[name].append(res)
        summary = {}
        for name, rs in results.items():
            ok = [x for x in rs if "error" not in x]
            if not ok:
                summary[name] = {"error": rs[0].get("error") if rs else "no runs"}
                continue
            summary[name] = {
                k: common.median([x[k] for x in ok])
                for k in ("ttft_s", "prefill_tps", "decode_tps", "peak_rss_bytes", "weight_bytes")
            }
            summary[name]["n"] = len(ok)
            summary[name]["tokens"] = min(x["tokens"] for x in ok)
        return {"prompt_tokens": len(ids), "new_tokens": n_new, "runs": runs, "summary": summary}


def report(res: dict, limits: dict) -> str:
    s = res["summary"]
    lines = [
        f"prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens greedy (fewer "
        f"where `new` says so), medians of {res['runs']} alternating rounds (n = runs that "
        "completed)",
        "",
        "| setup | n | new | prefill tok/s | decode tok/s | TTFT s | peak RSS MiB | weights MiB "
        "| decode limit tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in s.items():
        if "error" in v:
            lines.append(f"| {name} | 0 | | error: {v['error']} | | | | | |")
            continue
        limit = limits["copy_gbs"] * 1e9 / v["weight_bytes"] if v["weight_bytes"] else float("nan")
        lines.append(
            f"| {name} | {v['n']} | {v['tokens']} | {v['prefill_tps']:.1f} | {v['decode_tps']:.2f} "
            f"| {v['ttft_s']:.2f} | {v['peak_rss_bytes'] / 2**20:.0f} "
            f"| {v['weight_bytes'] / 2**20:.0f} | {limit:.0f} |"
        )
    for base_name in ("mlx-lm-fp32", "mlx-lm-q4", "llama.cpp"):
        base = s.get(base_name, {})
        # vs mlx-lm-fp32 every other setup (as before); vs the others, ours only
        others = [
            n
            for n, v in s.items()
            if n != base_name
            and "error" not in v
            and (n.startswith("ours") or base_name == "mlx-lm-fp32")
        ]
        if "decode_tps" not in base or not others:
            continue
        lines += [
            "",
            f"Ours / {base_name} (tok/s: above 1 is faster; TTFT and RSS: below 1 is better):",
            "",
        ]
        for name in others:
            v = s[name]
            lines.append(
                f"- {name}: prefill {common.fmt_ratio(v['prefill_tps'], base['prefill_tps'])}, "
                f"decode {common.fmt_ratio(v['decode_tps'], base['decode_tps'])}, "
                f"TTFT {common.fmt_ratio(v['ttft_s'], base['ttft_s'])}, "
                f"peak RSS {common.fmt_ratio(v['peak_rss_bytes'], base['peak_rss_bytes'])}"
            )
    if not llama_cpp_available():
        lines += ["", "llama.cpp: `llama_cpp` is not importable here; skipped."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-openblas", action="store_true")
    ap.add_argument("--with-refblas", action="store_true", help="add mlx-lm on the reference BLAS")
    ap.add_argument("--q4-new-tokens", type=int, default=16, help="new tokens for mlx-lm-q4")
    ap.add_argument("--q4-runs", type=int, default=1, help="rounds mlx-lm-q4 joins")
    ap.add_argument(
        "--q4-dtype", default=Q4_DTYPE, choices=("bfloat16", "float16", "float32"),
        help="mlx-lm-q4's dtype of scales and activations",
    )  # fmt: skip
    ap.add_argument("--setups", nargs="*", choices=SETUPS, help="subset of setups to run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        ids = json.loads(Path(args.ids_file).read_text())
        out = WORKERS[args.worker](args.path, ids, args.new_tokens)
        out["peak_rss_bytes"] = common.peak_rss_bytes()
        print(json.dumps(out))
        return 0
    from engine.defaults import ensure_default_model

    gguf = args.model or str(ensure_default_model(progress=lambda *a: None))
    res = benchmark(
        gguf,
        args.runs,
        args.prompt_tokens,
        args.new_tokens,
        not args.no_openblas,
        args.setups,
        args.with_refblas,
        args.q4_new_tokens,
        args.q4_dtype,
        args.q4_runs,
    )
    print(report(res, {"copy_gbs": common.copy_bandwidth_gbs()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
