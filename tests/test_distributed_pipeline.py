"""Pipeline-parallel inference over 2 and 3 processes (MLX ring on 127.0.0.1) equals one process.

Proves, on tiny random checkpoints written by transformers' `save_pretrained` (a dense llama and a
DeepSeek-V3-shaped MLA + MoE model): the greedy tokens and every step's log-probabilities of
`generate_step` driven on rank 0, and the full-sequence logits, equal a single process's
`engine.load` to 1e-5; each rank's parameter bytes equal the checkpoint bytes of exactly its layers
(+ embedding/head), counted independently from the safetensors headers, and are within one layer
of its share; and a rank that dies or hangs makes rank 0 stop with one clear error line in
seconds instead of hanging.

Run as a script, this file is the rank program the tests launch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PROMPT = [3, 17, 42, 5, 99, 23, 7, 64, 11]
N_TOKENS = 6
HERE = Path(__file__).resolve()


# --- the rank program ---------------------------------------------------------------------------


def _rank_main(folder: str, out: str, shares: str) -> None:
    import mlx.core as mx

    from engine.distributed import init_group
    from engine.generate import generate_step
    from engine.pipeline import load_stage

    group = init_group()
    share_list = [float(s) for s in shares.split(",")] if shares else None
    loaded = load_stage(folder, group, share_list, dtype="float32")
    stage = loaded.model
    me = group.rank()
    report = {
        "rank": me,
        "range": list(stage.layer_range),
        "param_bytes": loaded.info.weight_bytes,
        "active_memory": int(mx.get_active_memory()),
    }
    die_after = int(os.environ.get("TEST_DIE_AFTER", "0"))
    if me != 0:
        if die_after and me == group.size() - 1:
            # serve a few requests, then vanish (kill) or stop answering (hang)
            orig = stage._run_layers
            count = {"n": 0}

            def run_layers(h, cache):
                count["n"] += 1
                if count["n"] > die_after:
                    if os.environ.get("TEST_HANG"):
                        time.sleep(3600)
                    os._exit(9)
                return orig(h, cache)

            stage._run_layers = run_layers
        Path(f"{out}.{me}").write_text(json.dumps(report))
        stage.serve_forever()
        return
    try:
        full = np.array(stage(mx.array([PROMPT])))
        tokens, logprobs = [], []
        cache = stage.make_cache()
        for (tok, lp), _ in zip(generate_step(stage, PROMPT, cache), range(N_TOKENS)):
            tokens.append(int(tok))
            logprobs.append(np.array(lp).tolist())
        # a second conversation turn on the same cache, trimmed back (workers trim alike)
        for c in cache:
            c.trim(c.offset - 4)
        again = np.array(stage(mx.array([PROMPT[4:]]), cache=cache)[0, -1]).tolist()
        forked = _fork(stage, cache, 2)  # as Engine's prefix cache forks a conversation
        fork = np.array(stage(mx.array([PROMPT[2:]]), cache=forked)[0, -1]).tolist()
        report.update(full=full.tolist(), tokens=tokens, logprobs=logprobs, again=again, fork=fork)
        Path(f"{out}.0").write_text(json.dumps(report))
    finally:
        stage.close()


# --- helpers ------------------------------------------------------------------------------------


def _fork(model, cache: list, keep: int) -> list:
    """A new cache holding the first `keep` tokens of `cache` (what engine/session.py's _fork does)."""
    new = model.make_cache()
    for dst, src in zip(new, cache):
        dst.state, dst.meta_state = src.state, src.meta_state
        dst.trim(dst.offset - keep)
    return new


def _tiny_llama(folder: Path) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _tiny_deepseek_v3(folder: Path) -> Path:
    import torch
    import transformers

    cfg = transformers.DeepseekV3Config(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger than the default init, so routing and logits are not flat
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _header_bytes(folder: Path) -> dict[str, int]:
    """Tensor name -> bytes, read from the safetensors headers (not through MLX)."""
    out = {}
    for f in folder.glob("*.safetensors"):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        for k, v in json.loads(raw[8 : 8 + n]).items():
            if k != "__metadata__":
                out[k] = v["data_offsets"][1] - v["data_offsets"][0]
    return out


def _expected_bytes(folder: Path, start: int, end: int, first: bool, last: bool, tied: bool) -> int:
    total = 0
    for k, b in _header_bytes(folder).items():
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if m:
            total += b if start <= int(m.group(1)) < end else 0
        elif k.startswith("model.embed_tokens."):
            total += b if (first or (last and tied)) else 0
        elif k.startswith(("model.norm.", "lm_head.")):
            total += b if last else 0
    return total


def _launch(
    n: int, folder: Path, out: Path, shares: str = "", env: dict | None = None, timeout: float = 90
) -> list[subprocess.CompletedProcess]:
    from engine.distributed import spawn_local

    procs = spawn_local(
        n,
        [str(HERE), str(folder), str(out), shares],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def _single(folder: Path) -> dict:
    import mlx.core as mx

    import engine
    from engine.generate import generate_step

    loaded = engine.load(folder, dtype="float32")
    full = np.array(loaded.model(mx.array([PROMPT])))
    cache = loaded.model.make_cache()
    tokens, logprobs = [], []
    for (tok, lp), _ in zip(generate_step(loaded.model, PROMPT, cache), range(N_TOKENS)):
        tokens.append(int(tok))
        logprobs.append(np.array(lp))
    for c in cache:
        c.trim(c.offset - 4)
    again = np.array(loaded.model(mx.array([PROMPT[4:]]), cache=cache)[0, -1])
    forked = _fork(loaded.model, cache, 2)
    fork = np.array(loaded.model(mx.array([PROMPT[2:]]), cache=forked)[0, -1])
    return {
        "full": full,
        "tokens": tokens,
        "logprobs": np.array(logprobs),
        "again": again,
        "fork": fork,
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("pipe")
    return {"llama": _tiny_llama(root / "llama"), "deepseek_v3": _tiny_deepseek_v3(root / "dsv3")}


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,n",
    [
        ("llama", 2),
        ("deepseek_v3", 2),
        pytest.param("llama", 3, marks=pytest.mark.slow),
        pytest.param("deepseek_v3", 3, marks=pytest.mark.slow),
    ],
)
def test_pipeline_equals_one_process(checkpoints, tmp_path, family, n):
    folder = checkpoints[family]
    ref = _single(folder)
    out = tmp_path / "out"
    runs = _launch(n, folder, out)
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    reports = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(n)]
    got = reports[0]
    assert got["tokens"] == ref["tokens"]
    np.testing.assert_allclose(np.array(got["logprobs"]), ref["logprobs"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(got["full"]), ref["full"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(got["again"]), ref["again"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(got["fork"]), ref["fork"], atol=1e-5, rtol=0)

    # the layers are split contiguously, and each rank holds exactly its own tensors
    ranges = [tuple(rep["range"]) for rep in reports]
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert ranges[-1][1] == n_layers
    tied = family == "deepseek_v3"
    headers = _header_bytes(folder)
    everything = sum(headers.values()) + (headers["model.embed_tokens.weight"] if tied else 0)
    layer = max(_expected_bytes(folder, i, i + 1, False, False, tied) for i in range(n_layers))
    for r, rep in enumerate(reports):
        want = _expected_bytes(folder, *ranges[r], r == 0, r == n - 1, tied)
        assert rep["param_bytes"] == want
        assert abs(rep["param_bytes"] - everything / n) <= layer  # ≈ its share, to one layer
        assert rep["active_memory"] < sum(headers.values())  # never read the others' tensors


def test_shares_move_layers(checkpoints, tmp_path):
    """A host with 3x the memory gets ~3x the bytes; answers are unchanged."""
    folder = checkpoints["llama"]
    out = tmp_path / "out"
    runs = _launch(2, folder, out, shares="1,3")
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    reps = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert reps[0]["range"][1] - reps[0]["range"][0] < reps[1]["range"][1] - reps[1]["range"][0]
    assert reps[0]["tokens"] == _single(folder)["tokens"]


@pytest.mark.parametrize(
    "hang", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["killed", "hung"]
)
def test_lost_rank_stops_rank0_with_clear_error(checkpoints, tmp_path, hang):
    folder = checkpoints["llama"]
    env = {"TEST_DIE_AFTER": "3", "LATENT_DIST_TIMEOUT": "4"}
    if hang:
        env["TEST_HANG"] = "1"
    t0 = time.monotonic()
    from engine.distributed import spawn_local

    procs = spawn_local(
        2,
        [str(HERE), str(folder), str(tmp_path / "out"), ""],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err0 = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    elapsed = time.monotonic() - t0
    assert procs[0].returncode != 0
    lines = [ln for ln in err0.splitlines() if ln.startswith("error:") or "DistributedError" in ln]
    assert lines, err0[-2000:]
    assert "rank 0" in lines[-1] and (
        "lost the connection" in lines[-1] or "no answer for 4 s" in lines[-1]
    )
    assert elapsed < 40


@pytest.mark.slow
def test_cli_generate_over_hosts_equals_one_process(tmp_path):
    """`latent generate --hosts` (mlx.launch, 2 ranks on 127.0.0.1) answers as without --hosts."""
    pytest.importorskip("tokenizers")
    from test_distributed_lora import make_tiny

    model, _ = make_tiny(tmp_path, hidden=64, layers=4)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    argv = [
        sys.executable,
        "-m",
        "app.cli",
        "generate",
        "--model",
        str(model),
        "--raw",
        "--prompt",
        "Ada has 3",
        "--temp",
        "0",
        "--max-tokens",
        "12",
        "--json",
    ]
    env = {**os.environ, "LATENT_NO_OPENBLAS": "1", "LATENT_DIST_TIMEOUT": "30"}
    one = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [*argv, "--hosts", str(hosts)], capture_output=True, text=True, env=env, timeout=180
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert "pipeline over 2 processes" in two.stderr
    a = json.loads(one.stdout.strip().splitlines()[-1])
    b = json.loads([ln for ln in two.stdout.splitlines() if ln.startswith("{")][-1])
    assert len(a["tokens"]) == 12 and b["tokens"] == a["tokens"] and b["text"] == a["text"]


def test_split_layers_by_share():
    from engine.pipeline import split_layers

    assert split_layers([10] * 6, [1, 1]) == [(0, 3), (3, 6)]
    assert split_layers([10] * 6, [1, 1, 1]) == [(0, 2), (2, 4), (4, 6)]
    assert split_layers([10] * 8, [1, 3]) == [(0, 2), (2, 8)]
    # a big embedding on rank 0 pushes layers to rank 1
    assert split_layers([10] * 6, [1, 1], first_bytes=20) == [(0, 2), (2, 6)]
    assert split_layers([10] * 3, [1, 1, 1]) == [(0, 1), (1, 2), (2, 3)]


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
