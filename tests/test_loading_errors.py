"""Bad model input ends in one `ModelLoadError` line that names the file or value at fault.

Covers: a missing path, a folder with no model, config without weights, a truncated safetensors
file, a safetensors header that lies about a tensor's size, a missing shard, broken config JSON,
an unknown model_type, config/weight shape mismatch, a missing tensor, a GGUF with an unsupported
tensor type, a truncated GGUF, a repo id not present locally. The small GGUF files are written
with the `gguf` package (llama.cpp's own writer), independent of our reader; a well-formed one is
checked to load, so the failures are caused by the defect each test introduces.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import engine
from engine.errors import ModelLoadError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def _fails(path, *needles: str, **kw) -> str:
    with pytest.raises(ModelLoadError) as e:
        engine.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    folder = tmp_path / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    engine.load(folder)  # sound before each test breaks it
    return folder


def _rewrite_header(path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_missing_path(tmp_path):
    _fails(tmp_path / "nope", "nope", "no such file")


def test_folder_without_model(tmp_path):
    _fails(tmp_path, str(tmp_path), "no config.json")


def test_config_without_weights(tiny):
    (tiny / "model.safetensors").unlink()
    _fails(tiny, "no *.safetensors")


def test_bad_config_json(tiny):
    (tiny / "config.json").write_text("{not json")
    _fails(tiny, "config.json", "not valid JSON")


def test_truncated_safetensors(tiny):
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(tiny, "model.safetensors", "truncated")


def test_header_lies_about_sizes(tiny):
    f = tiny / "model.safetensors"

    def grow(header):
        header["model.norm.weight"]["shape"] = [64]  # offsets still span 32 floats

    _rewrite_header(f, grow)
    _fails(tiny, "model.safetensors", "model.norm.weight", "header lies")


def test_header_offsets_past_end(tiny):
    f = tiny / "model.safetensors"

    def shift(header):
        entry = header["model.norm.weight"]
        b, e = entry["data_offsets"]
        entry["data_offsets"] = [b + 10**9, e + 10**9]

    _rewrite_header(f, shift)
    _fails(tiny, "model.norm.weight", "truncated")


def test_missing_shard(tiny):
    weights = json.loads(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    (tiny / "model.safetensors.index.json").write_text(json.dumps(weights))
    _fails(tiny, "model-00002-of-00002.safetensors", "missing")


def test_unknown_model_type(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["model_type"] = "wonderllm"
    (tiny / "config.json").write_text(json.dumps(cfg))
    _fails(tiny, "'wonderllm'", "unknown model_type")


def test_shape_mismatch(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tiny / "config.json").write_text(json.dumps(cfg))
    _fails(tiny, "mlp", "shape", "(48, 32)")


def test_missing_tensor(tiny):
    from safetensors.numpy import load_file, save_file

    f = tiny / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    _fails(tiny, "model.layers.0.self_attn.k_proj.weight", "missing tensor")


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    _fails(f, "weights.bin")


def test_repo_id_not_local(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fails("nobody/no-such-model", "nobody/no-such-model", "not found locally")


# --- GGUF ------------------------------------------------------------------------------------

D, FF, V = 32, 64, 48


def _write_gguf(path, extra=None):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)

    def t(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.02)

    t("token_embd.weight", V, D)
    t("output_norm.weight", D)
    t("blk.0.attn_norm.weight", D)
    t("blk.0.ffn_norm.weight", D)
    for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(f"blk.0.{n}.weight", D, D)
    t("blk.0.ffn_gate.weight", FF, D)
    t("blk.0.ffn_up.weight", FF, D)
    if extra is None:
        t("blk.0.ffn_down.weight", D, FF)
    else:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_small_gguf_loads(tmp_path):
    loaded = engine.load(_write_gguf(tmp_path / "ok.gguf"))
    assert loaded.config["hidden_size"] == D and loaded.config["tie_word_embeddings"]


def test_gguf_unsupported_tensor_type(tmp_path):
    def q6k(w):
        # Q6_K: blocks of 256 values in 210 bytes; FF=64 is too short a row, so use (D, 256)
        raw = np.zeros((D, 210), dtype=np.uint8)
        w.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q6_K)

    path = _write_gguf(tmp_path / "q6k.gguf", q6k)
    _fails(path, "q6k.gguf", "blk.0.ffn_down.weight", "Q6_K", "not supported")


def test_truncated_gguf(tmp_path):
    path = _write_gguf(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-500])
    _fails(path, "cut.gguf", "truncated")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 64)
    _fails(path, "fake.gguf", "not a GGUF")


def test_pickle_weights_refused(tiny):
    (tiny / "model.safetensors").rename(tiny / "pytorch_model.bin")
    _fails(tiny, "pickle", str(tiny))


def test_gguf_header_with_huge_counts(tmp_path):
    """A header whose string/array lengths exceed the file is refused without allocating them."""
    path = tmp_path / "liar.gguf"
    # magic, version 3, 0 tensors, 1 key; key "k" of type array(uint8) with 2^40 elements
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
    body += struct.pack("<IIQ", 9, 0, 2**40)
    path.write_bytes(body + b"\0" * 16)
    _fails(path, "liar.gguf", "GGUF header")


def test_header_with_nonsense_shape(tiny):
    def nonsense(header):
        header["model.norm.weight"]["shape"] = ["32"]

    _rewrite_header(tiny / "model.safetensors", nonsense)
    _fails(tiny, "model.norm.weight", "corrupt safetensors header")


def test_safetensors_header_fuzz(tmp_path):
    """Random header entries never escape as anything but ModelLoadError."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from engine.loading import check_safetensors

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.text(max_size=5))
    value = st.one_of(
        scalar, st.lists(scalar, max_size=4), st.dictionaries(st.text(max_size=3), scalar)
    )
    dtype = st.one_of(st.sampled_from(["F32", "BF16", "U8", "X9"]), value)
    shape = st.one_of(st.lists(st.integers(0, 8), max_size=3), value)
    offsets = st.one_of(st.lists(st.integers(0, 300), min_size=2, max_size=2), value)
    entry = st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets})
    f = tmp_path / "fuzz.safetensors"

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(max_size=4), st.one_of(entry, value), max_size=3))
    @example({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}})
    @example({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}})
    @example({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}})
    def run(header):
        raw = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
        try:
            check_safetensors(f)
        except ModelLoadError:
            pass

    run()
