"""Generation benchmark: ours vs mlx-lm (and llama.cpp where installed) on the same weights.

    python bench/generate.py [--model GGUF] [--runs 3] [--prompt-tokens 512] [--new-tokens 128]

Setups (each run in a fresh subprocess, so peak RSS is per engine; rounds alternate setups):
- `ours-gguf`: our engine on the GGUF file as shipped (Q4_1 + Q8_0 tensors kept quantized);
- `ours-fp32`: our engine on an fp32 safetensors folder dequantized from the same GGUF;
- `mlx-lm-fp32`: mlx-lm on that same folder (its default dtype for fp32 weights);
- `mlx-lm-fp32-refblas` (`--with-refblas`): mlx-lm as a user runs it, on MLX's bundled BLAS;
- `llama.cpp`: llama-cpp-python on the GGUF, only where `llama_cpp` is importable.
Every setup gets the same prompt ids and greedy decoding of exactly `new-tokens` tokens (EOS
does not stop it). OpenBLAS is preloaded for every MLX process alike (see engine/blas.py);
`--no-openblas` runs them all on MLX's bundled reference BLAS instead.
The worker mode (`--worker SETUP`) is what the subprocesses run.
"""

from __future__ import annotations

import argparse
import json
import os
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


def worker_llama_cpp(path: str, ids: list[int], n_new: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    t0 = time.perf_counter()
    steps = llm.generate(ids, top_k=1, temp=0.0, reset=True)
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


def benchmark(
    gguf: str,
    runs: int,
    n_prompt: int,
    n_new: int,
    openblas: bool = True,
    setups=None,
    refblas: bool = False,
) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="latent-bench-"))
    fp32 = write_fp32_folder(gguf, tmp / "fp32")
    ids = prompt_ids(gguf, n_prompt)
    ids_file = tmp / "ids.json"
    ids_file.write_text(json.dumps(ids))
    plan = {
        "ours-gguf": ("ours", gguf, openblas),
        "ours-fp32": ("ours", str(fp32), openblas),
        "mlx-lm-fp32": ("mlx-lm", str(fp32), openblas),
    }
    if refblas:  # mlx-lm exactly as a user runs it: MLX's bundled reference BLAS
        plan["mlx-lm-fp32-refblas"] = ("mlx-lm", str(fp32), False)
    if llama_cpp_available():
        plan["llama.cpp"] = ("llama.cpp", gguf, False)
    if setups:
        plan = {k: v for k, v in plan.items() if k in setups}
    results: dict[str, list[dict]] = {k: [] for k in plan}
    for r in range(runs):
        order = list(plan) if r % 2 == 0 else list(reversed(plan))  # alternate
        for name in order:
            kind, path, blas = plan[name]
            res = run_worker(kind, path, str(ids_file), n_new, blas)
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
    return {"prompt_tokens": len(ids), "new_tokens": n_new, "runs": runs, "summary": summary}


def report(res: dict, limits: dict) -> str:
    s = res["summary"]
    lines = [
        f"prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens greedy, "
        f"medians of {res['runs']} alternating rounds (n = runs that completed)",
        "",
        "| setup | n | prefill tok/s | decode tok/s | TTFT s | peak RSS MiB | weights MiB "
        "| decode limit tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in s.items():
        if "error" in v:
            lines.append(f"| {name} | 0 | error: {v['error']} | | | | | |")
            continue
        limit = limits["copy_gbs"] * 1e9 / v["weight_bytes"] if v["weight_bytes"] else float("nan")
        lines.append(
            f"| {name} | {v['n']} | {v['prefill_tps']:.1f} | {v['decode_tps']:.1f} | {v['ttft_s']:.2f} | "
            f"{v['peak_rss_bytes'] / 2**20:.0f} | {v['weight_bytes'] / 2**20:.0f} | {limit:.0f} |"
        )
    base = s.get("mlx-lm-fp32", {})
    if "decode_tps" in base:
        lines += [
            "",
            "Ours / mlx-lm-fp32 (tok/s: above 1 is faster; TTFT and RSS: below 1 is better):",
            "",
        ]
        for name, v in s.items():
            if name == "mlx-lm-fp32" or "error" in v:
                continue
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
    ap.add_argument("--setups", nargs="*", help="subset of setups to run")
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
    )
    print(report(res, {"copy_gbs": common.copy_bandwidth_gbs()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
