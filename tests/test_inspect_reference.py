"""The numpy float64 reference (engine/inspect_ref.py) equals HF transformers run in float64.

For tiny random configs of llama (MHA, GQA, tied, llama3 RoPE, YaRN), mistral with a sliding
window, qwen2 (q/k/v bias), qwen3 (q/k norm, explicit head_dim) and gpt2, the HF model is cast
with `.double()` and its state dict handed to the reference under the engine's names (gpt2's
Conv1D weights transposed as `Model.sanitize` does). Every residual-stream state, the final
normed state and the logits must agree to 1e-10 (gpt2) or 1e-6 (RoPE families: transformers
builds `inv_freq` and the rotary angles in float32 even in a float64 model, ~1e-7 of its own
error on the logits; its
RMSNorm also upcasts only to float32, so the test swaps in a float64-preserving forward); attention rows from the reference sum to 1 and
give future tokens exactly zero weight.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.inspect_ref import reference_forward  # noqa: E402

BASE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def _llama(**kw):
    cfg = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **kw}
    return transformers.LlamaConfig(**cfg), transformers.LlamaForCausalLM


CASES = {
    "llama-gqa": lambda: _llama(),
    "llama-tied-mha": lambda: _llama(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": lambda: _llama(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500.0,
        }
    ),
    "yarn-rope": lambda: _llama(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 16,
        }
    ),
    "mistral-window": lambda: (
        transformers.MistralConfig(**{**BASE, "num_key_value_heads": 1, "sliding_window": 4}),
        transformers.MistralForCausalLM,
    ),
    "qwen2": lambda: (
        transformers.Qwen2Config(**BASE, tie_word_embeddings=True, use_sliding_window=False),
        transformers.Qwen2ForCausalLM,
    ),
    "qwen3": lambda: (
        transformers.Qwen3Config(**BASE, head_dim=16, tie_word_embeddings=False),
        transformers.Qwen3ForCausalLM,
    ),
    "gpt2": lambda: (
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64),
        transformers.GPT2LMHeadModel,
    ),
}


def engine_named_weights(model, model_type: str) -> dict[str, np.ndarray]:
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if model_type == "gpt2":  # Conv1D (in, out) -> Linear (out, in), as gpt2.sanitize does
        for k in list(w):
            if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                w[k] = w[k].T
    return w


def _rms_forward_keep_dtype(self, x):
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.fixture
def float64_rmsnorm(monkeypatch):
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    for mod, name in (
        (modeling_llama, "LlamaRMSNorm"),
        (modeling_mistral, "MistralRMSNorm"),
        (modeling_qwen2, "Qwen2RMSNorm"),
        (modeling_qwen3, "Qwen3RMSNorm"),
    ):
        monkeypatch.setattr(getattr(mod, name), "forward", _rms_forward_keep_dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_equals_transformers_float64(case, float64_rmsnorm):
    torch.manual_seed(0)
    cfg, cls = CASES[case]()
    cfg._attn_implementation = "eager"
    model = cls(cfg).double().eval()
    ids = np.random.default_rng(1).integers(0, 64, size=11)
    with torch.no_grad():
        out = model(torch.tensor(ids[None]), output_hidden_states=True)
    ref = reference_forward(
        cfg.to_dict(), engine_named_weights(model, cfg.model_type), ids, want_attention=True
    )
    hf_hidden = [h[0].numpy() for h in out.hidden_states]
    tol = 1e-10 if cfg.model_type == "gpt2" else 1e-6
    # HF's last hidden state is after the final norm; the ones before are the residual stream
    for i, (a, b) in enumerate(zip(ref.hidden[:-1], hf_hidden[:-1])):
        assert np.abs(a - b).max() < tol, f"{case}: residual after layer {i - 1}"
    assert np.abs(ref.final - hf_hidden[-1]).max() < tol
    assert np.abs(ref.logits - out.logits[0].numpy()).max() < tol
    assert len(ref.attention) == len(hf_hidden) - 1
    for p in ref.attention:
        assert p.shape == (
            cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head,
            11,
            11,
        )
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
        assert np.all(np.triu(p, k=1) == 0.0)


DEEPSEEK = dict(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    max_position_embeddings=256,
)
DEEPSEEK_CASES = {
    "v2-greedy": (
        "deepseek_v2",
        dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=0),
    ),
    "v2-group-limited": (
        "deepseek_v2",
        dict(
            q_lora_rank=20,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
        ),
    ),
    "v3-noaux-yarn": (
        "deepseek_v3",
        dict(
            q_lora_rank=20,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                beta_fast=32,
                beta_slow=1,
                mscale=1.0,
                mscale_all_dim=0.8,
            ),
        ),
    ),
}


def _deepseek_engine_names(model) -> dict[str, np.ndarray]:
    """HF DeepSeek state dict -> engine names (fused experts split into stacked gate/up/down)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().numpy()
        if k.endswith("mlp.experts.gate_up_proj"):  # (E, 2F, D): gate rows, then up rows
            f = v.shape[1] // 2
            out[k.replace("experts.gate_up_proj", "switch_mlp.gate_proj.weight")] = v[:, :f]
            out[k.replace("experts.gate_up_proj", "switch_mlp.up_proj.weight")] = v[:, f:]
        elif k.endswith("mlp.experts.down_proj"):
            out[k.replace("experts.down_proj", "switch_mlp.down_proj.weight")] = v
        elif "rotary_emb" not in k:
            out[k] = v
    return out


@pytest.mark.parametrize("case", list(DEEPSEEK_CASES))
def test_deepseek_reference_equals_transformers_float64(case, monkeypatch):
    """MLA + MoE reference vs transformers DeepSeek in float64. Its RMSNorm is swapped for a
    float64-keeping one as above; its router and RoPE tables still run in float32, so the bound
    is 1e-6 relative to the largest logit."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    monkeypatch.setattr(modeling_deepseek_v2.DeepseekV2RMSNorm, "forward", _rms_forward_keep_dtype)
    monkeypatch.setattr(modeling_deepseek_v3.DeepseekV3RMSNorm, "forward", _rms_forward_keep_dtype)
    family, kw = DEEPSEEK_CASES[case]
    Config, Model = {
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }[family]
    cfg = Config(**DEEPSEEK, **kw, experts_implementation="eager")
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that routing and attention are not uniform
        for name, p in model.named_parameters():
            scale = 0.1 if ("norm" in name) else 0.15
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
    model = model.double()
    ids = np.random.default_rng(1).integers(0, 64, size=9)
    with torch.no_grad():
        out = model(torch.tensor(ids[None]), output_hidden_states=True)
    ref = reference_forward(cfg.to_dict(), _deepseek_engine_names(model), ids, want_attention=True)
    hf_logits = out.logits[0].numpy()
    assert np.abs(hf_logits).max() > 0.5
    assert np.abs(ref.logits - hf_logits).max() < 1e-6 * max(1.0, np.abs(hf_logits).max())
    n_moe = sum(1 for i in range(3) if i >= kw["first_k_dense_replace"])
    assert len(ref.router) == n_moe and all(r[0].shape == (9, 2) for r in ref.router)
    for p in ref.attention:
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
        assert np.all(np.triu(p, k=1) == 0.0)
