"""Mixture of experts: router math, stacked experts, Mixtral and Qwen2-MoE.

Proves: `route` picks the same experts with the same weights as a float64 numpy reference written
from the methods' definitions (greedy, group_limited_greedy, noaux_tc; softmax/sigmoid; the
correction bias steering selection only; normalisation; V2 vs V3 scaling) on hand-made scores
where the methods disagree and on random ones; the gathered-matmul experts (sorted and unsorted,
plain and 4-bit quantized) equal a per-token numpy loop; Mixtral and Qwen2-MoE checkpoints match
transformers to 1e-4 and decode step by step like the full forward; the router capture records
exactly the experts and weights transformers' router logits imply.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import engine
from engine.layers.moe import RouterCapture, RouterSpec, SwitchGLU, route

# ---------------------------------------------------------------------------- numpy reference


def np_route(logits, spec: RouterSpec, bias=None):
    logits = np.asarray(logits, np.float64)
    if spec.scoring_func == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    choice = scores + (0 if bias is None else np.asarray(bias, np.float64))
    ids, weights = [], []
    for row_choice, row_scores in zip(choice, scores):
        c = row_choice.copy()
        if spec.topk_method != "greedy":
            groups = c.reshape(spec.n_group, -1)
            if spec.topk_method == "group_limited_greedy":
                gscore = groups.max(-1)
            else:
                gscore = np.sort(groups, -1)[:, -2:].sum(-1)
            keep = np.argsort(-gscore)[: spec.topk_group]
            allowed = np.zeros(spec.n_group, bool)
            allowed[keep] = True
            c = np.where(np.repeat(allowed, c.size // spec.n_group), c, -np.inf)
        top = np.sort(np.argsort(-c)[: spec.top_k])
        w = row_scores[top]
        normalized = spec.norm_topk_prob and spec.top_k > 1
        if normalized:
            w = w / w.sum()
        if spec.scale_normalized or not normalized:
            w = w * spec.routed_scaling_factor
        ids.append(top)
        weights.append(w)
    return np.array(ids), np.array(weights)


def _sorted(ids, weights):
    ids, weights = np.array(ids), np.array(weights)
    order = np.argsort(ids, -1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


# 8 experts in 4 groups of 2. Row 0: greedy -> {0, 2}; best group by max -> g0 -> {0, 1};
# best group by top-2 sum -> g1 -> {2, 3}. Row 1: a bias on expert 7 drags it in under noaux_tc.
HAND = np.array(
    [
        [3.0, -2.0, 2.9, 2.8, -1.0, -1.0, 0.0, 0.0],
        [1.0, 0.5, -0.5, 2.0, 0.2, -0.3, 0.1, -4.0],
    ]
)
BIAS = np.array([0, 0, 0, 0, 0, 0, 0, 9.0])


def test_hand_made_scores_separate_the_methods():
    k2 = dict(top_k=2, n_group=4, topk_group=1)
    expected = {
        ("greedy", "softmax"): [0, 2],
        ("group_limited_greedy", "softmax"): [0, 1],
        ("noaux_tc", "sigmoid"): [2, 3],
    }
    for (method, scoring), want in expected.items():
        spec = RouterSpec(topk_method=method, scoring_func=scoring, **k2)
        ids, _ = route(mx.array(HAND, mx.float32), spec)
        assert sorted(np.array(ids)[0].tolist()) == want, method
    spec = RouterSpec(
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        top_k=2,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    ids, weights = _sorted(*route(mx.array(HAND, mx.float32), spec, mx.array(BIAS, mx.float32)))
    assert 7 in ids[1].tolist()
    # weights come from the unbiased sigmoid scores
    s = 1 / (1 + np.exp(-HAND[1, ids[1]]))
    np.testing.assert_allclose(weights[1], 2.5 * s / s.sum(), rtol=1e-5)


SPECS = [
    RouterSpec(top_k=2),
    RouterSpec(top_k=3, norm_topk_prob=True),
    RouterSpec(top_k=2, routed_scaling_factor=1.7, scale_normalized=False),
    RouterSpec(top_k=2, norm_topk_prob=True, routed_scaling_factor=1.7, scale_normalized=False),
    RouterSpec(
        top_k=3,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=16.0,
    ),
    RouterSpec(
        top_k=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    RouterSpec(top_k=4, topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1),
    RouterSpec(top_k=2, scoring_func="sigmoid", norm_topk_prob=True),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.topk_method}-{s.scoring_func}-k{s.top_k}"
)
def test_route_matches_numpy(spec):
    rng = np.random.default_rng(0)
    logits = np.concatenate([HAND, rng.normal(size=(40, 8)) * 2])
    bias = rng.normal(size=8) * 0.3 if spec.topk_method == "noaux_tc" else None
    got = _sorted(
        *route(
            mx.array(logits, mx.float32), spec, None if bias is None else mx.array(bias, mx.float32)
        )
    )
    want = np_route(logits, spec, bias)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_bad_topk_method_rejected():
    with pytest.raises(ValueError, match="topk_method 'sinkhorn'.*greedy"):
        RouterSpec(top_k=2, topk_method="sinkhorn")


# ---------------------------------------------------------------------------- stacked experts


def _np_experts(x, inds, gate, up, down):
    x = np.asarray(x, np.float64)
    out = np.zeros((*inds.shape, down.shape[1]))
    for t in range(inds.shape[0]):
        for j, e in enumerate(inds[t]):
            g, u = gate[e] @ x[t], up[e] @ x[t]
            out[t, j] = down[e] @ (g / (1 + np.exp(-g)) * u)
    return out


@pytest.mark.parametrize("n_tokens", [3, 50])  # unsorted (decode) and sorted gather paths
@pytest.mark.parametrize("quantized", [False, True])
def test_switch_glu_matches_per_token_loop(n_tokens, quantized):
    mx.random.seed(1)
    layer = SwitchGLU(64, 64, 6)
    if quantized:
        nn.quantize(
            layer, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
        )
        assert type(layer.gate_proj).__name__ == "QuantizedSwitchLinear"

        def dense(m):
            return np.array(mx.dequantize(m.weight, m.scales, m.biases, 32, 4), np.float64)
    else:

        def dense(m):
            return np.array(m.weight, np.float64)

    rng = np.random.default_rng(2)
    x = rng.normal(size=(n_tokens, 64)).astype(np.float32)
    inds = np.stack([rng.choice(6, 2, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    got = np.array(layer(mx.array(x), mx.array(inds)))
    want = _np_experts(
        x, inds, dense(layer.gate_proj), dense(layer.up_proj), dense(layer.down_proj)
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- HF parity

TOKENS = [[3, 17, 42, 9, 60, 1, 33, 7], [5, 5, 12, 63, 28, 40, 2, 19]]


def _transformers():
    import transformers.utils as tu
    import transformers.utils.import_utils as iu

    tu.is_kernels_available = iu.is_kernels_available = lambda *a, **k: False
    import transformers

    return transformers


def _checkpoint(tmp_path, family):
    import torch

    tf = _transformers()
    common = dict(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        config = tf.MixtralConfig(num_local_experts=6, num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(config)
    else:
        config = tf.Qwen2MoeConfig(
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            **common,
        )
        model = tf.Qwen2MoeForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "norm" in name else 0.15
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=g))
    model.eval()
    folder = tmp_path / family
    model.save_pretrained(folder)
    with torch.no_grad():
        out = model(torch.tensor(TOKENS), output_router_logits=True)
    router = [r.double().numpy() for r in out.router_logits if r is not None]
    return folder, out.logits.double().numpy(), router, config


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_matches_transformers_and_captures_router(tmp_path, family):
    folder, ref, router_logits, config = _checkpoint(tmp_path, family)
    model = engine.load(folder, dtype="float32").model
    assert model.capture is None
    model.capture = capture = RouterCapture()
    got = np.array(model(mx.array(TOKENS)))
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    # the capture holds one record per MoE layer: ids and weights as transformers' logits imply
    moe_layers = [0, 1, 2] if family == "mixtral" else [0, 2]
    assert [r[0] for r in capture.records] == moe_layers
    spec = RouterSpec(top_k=config.num_experts_per_tok, norm_topk_prob=family == "mixtral")
    for (_, ids, weights), logits in zip(capture.records, router_logits[-len(moe_layers) :]):
        assert ids.shape == (2, 8, config.num_experts_per_tok)
        want_ids, want_w = np_route(logits.reshape(-1, logits.shape[-1]), spec)
        got_ids, got_w = _sorted(np.array(ids).reshape(16, -1), np.array(weights).reshape(16, -1))
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_w, want_w, atol=1e-5)

    model.capture = None
    cache = model.make_cache()
    x = mx.array(TOKENS)
    steps = [model(x[:, :3], cache)] + [model(x[:, i : i + 1], cache) for i in range(3, 8)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), got, atol=1e-4, rtol=0)
    assert len(capture.records) == len(moe_layers)  # nothing recorded once switched off
