"""The teaching model (engine/models/tiny.py): every design combination computes, caches and trains.

Over positional {rope, alibi, sinusoidal, learned, none} × attention {mha, gqa, mla} × ffn
{dense, moe} × norm {rmsnorm, layernorm} (plus post-norm and no-residual variants):
- decoding token by token through `make_cache()` (after a 4-token prefill) gives the logits of
  the full forward (max abs diff ≤ 1e-4);
- the engine's residual stream after every layer and its logits equal the independent float64
  numpy forward (engine/inspect_ref.py) within fp32 tolerance — MoE routing, ALiBi slopes and
  MLA (K/V rebuilt from the latent) included;
- ten AdamW steps on one batch lower the cross-entropy (plus the MoE balancing loss), so
  gradients reach every design;
- `look` captures router choices (L, top_k) with weights summing to 1 for MoE layers.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from engine import inspect as ins
from engine.models.tiny import Model, ModelArgs

COMBOS = [
    dict(positional=p, attention=a, ffn=f, norm=n)
    for p, a, f, n in itertools.product(
        ("rope", "alibi", "sinusoidal", "learned", "none"),
        ("mha", "gqa", "mla"),
        ("dense", "moe"),
        ("rmsnorm", "layernorm"),
    )
] + [
    dict(positional="rope", attention="gqa", ffn="moe", norm="layernorm", pre_norm=False),
    dict(
        positional="alibi",
        attention="mha",
        ffn="dense",
        norm="rmsnorm",
        pre_norm=False,
        residual=False,
    ),
    dict(positional="learned", attention="mla", ffn="dense", norm="rmsnorm", residual=False),
    dict(
        positional="sinusoidal",
        attention="gqa",
        ffn="dense",
        norm="rmsnorm",
        tie_word_embeddings=False,
    ),
]


def _id(c: dict) -> str:
    return "-".join(str(v) if not isinstance(v, bool) else f"{k}{int(v)}" for k, v in c.items())


def make(**kw) -> Model:
    mx.random.seed(0)
    args = ModelArgs(
        vocab_size=40,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_experts=4,
        top_k=2,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        **kw,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


IDS = [1, 7, 3, 22, 9, 9, 30, 2, 14, 5]


@pytest.mark.parametrize("combo", COMBOS, ids=_id)
def test_cache_equals_full_and_reference(combo):
    model = make(**combo)
    full = model(mx.array([IDS]))
    cache = model.make_cache()
    steps = [model(mx.array([IDS[:4]]), cache=cache)]
    for t in IDS[4:]:
        steps.append(model(mx.array([[t]]), cache=cache))
    cached = mx.concatenate(steps, axis=1)
    assert float(mx.abs(cached - full).max()) < 1e-4
    loaded = SimpleNamespace(model=model, config={}, tokenizer=None)
    report = ins.check_math(loaded, IDS)
    assert report.max_rel < 1e-5, report.table()


@pytest.mark.parametrize("combo", COMBOS, ids=_id)
def test_trains(combo):
    model = make(**combo)
    x = mx.array([IDS[:-1], IDS[1:]])
    y = mx.array([IDS[1:], IDS[:-1]])

    def loss_fn(m):
        logits = m(x)
        return nn.losses.cross_entropy(logits, y).mean() + 0.01 * m.aux_loss()

    opt = optim.AdamW(3e-3)
    step = nn.value_and_grad(model, loss_fn)
    first = None
    for _ in range(10):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        first = float(loss) if first is None else first
    assert float(loss_fn(model)) < first - 0.05


def test_no_causal_mask_lets_tokens_see_the_future():
    model = make(causal=False)
    a = model(mx.array([IDS]))
    b = model(mx.array([IDS[:-1] + [0]]))
    assert float(mx.abs(a[0, 0] - b[0, 0]).max()) > 1e-6  # position 0 changed with the last token
    masked = make()
    a, b = masked(mx.array([IDS])), masked(mx.array([IDS[:-1] + [0]]))
    assert float(mx.abs(a[0, :-1] - b[0, :-1]).max()) == 0.0


def test_router_capture():
    model = make(ffn="moe")
    lk = ins.look(SimpleNamespace(model=model, config={}, tokenizer=None), IDS, top_k=3)
    assert sorted(lk.router) == [0, 1]
    for ids, w in lk.router.values():
        assert ids.shape == (len(IDS), 2) and w.shape == (len(IDS), 2)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
        assert np.all(w[:, 0] >= w[:, 1])
    assert [a.shape for a in lk.attention] == [(4, len(IDS), len(IDS))] * 2


def test_bad_choice_is_refused():
    with pytest.raises(ValueError, match="positional='fourier'"):
        ModelArgs(positional="fourier")


@pytest.mark.parametrize("attention", ["mha", "gqa", "mla"])
@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_attention_capture_equals_reference(attention, positional):
    """Captured attention (H, L, L) per layer equals the float64 reference's probabilities."""
    from engine.inspect_ref import reference_forward
    from engine.quant.convert import float_weights

    model = make(attention=attention, positional=positional)
    loaded = SimpleNamespace(model=model, config={}, tokenizer=None)
    lk = ins.look(loaded, IDS)
    ref = reference_forward(
        ins.reference_config(loaded), float_weights(model), IDS, want_attention=True
    )
    assert len(lk.attention) == len(ref.attention) == 2
    for got, want in zip(lk.attention, ref.attention):
        assert got.shape == (4, len(IDS), len(IDS))
        assert np.all(np.triu(got, k=1) == 0.0)
        assert np.abs(got - want).max() < 1e-5
