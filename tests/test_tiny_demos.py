"""Demonstrations on the teaching model, each a measurement that could come out the other way.

Data are synthetic so that the right answer is known: a random Markov chain over 32 tokens
(each token has two successors, p = 0.7 / 0.3, so a causal model's best loss is the chain's
entropy, 0.61 nats) and a copy task ([r1 r2 r3 SEP r1 r2 r3]).
- No causal mask: the training loss falls far below the masked run's (the model reads the
  answer from the future), and evaluated causally — as it must generate — it is far worse than
  the masked model: the leakage, measured.
- `positional="none"`: with only the causal mask to tell positions apart, the model still learns
  the order-dependent copy task (accuracy on the copied half far above the ~0.6 that a
  predictor knowing only which tokens occurred, not their order, could reach).
- Six layers without residual connections train markedly worse than with them.
- The MoE load-balancing loss keeps expert usage closer to uniform than training without it
  (coefficient of variation of the per-expert token share).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from engine.models.tiny import Model, ModelArgs

pytestmark = pytest.mark.slow
V = 32


def markov_batches(seed: int = 0, B: int = 16, L: int = 24):
    rng = np.random.default_rng(seed)
    succ = np.stack([rng.choice(V, 2, replace=False) for _ in range(V)])  # (V, 2) successors

    def batch(step: int):
        r = np.random.default_rng(1000 + step)
        seq = np.zeros((B, L + 1), np.int64)
        seq[:, 0] = r.integers(0, V, B)
        for t in range(L):
            seq[:, t + 1] = succ[seq[:, t], (r.random(B) < 0.3).astype(int)]
        return mx.array(seq[:, :-1]), mx.array(seq[:, 1:])

    return batch


def copy_batches(K: int = 3, B: int = 32):
    def batch(step: int):
        r = np.random.default_rng(step).integers(2, 12, (B, K))
        seq = np.concatenate([r, np.ones((B, 1), int), r], 1)  # token 1 is SEP
        return mx.array(seq[:, :-1]), mx.array(seq[:, 1:])

    return batch


def make(**kw) -> Model:
    mx.random.seed(0)
    args = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = Model(ModelArgs(**{**args, **kw}))
    mx.eval(model.parameters())
    return model


def train(model: Model, batches, steps: int, lr: float = 3e-3, aux: float = 0.0) -> float:
    """AdamW on cross-entropy (+ aux × balancing loss); mean loss of the last 20 steps."""
    opt = optim.AdamW(lr)

    def loss_fn(m, x, y):
        loss = nn.losses.cross_entropy(m(x), y).mean()
        return loss + aux * m.aux_loss() if aux else loss

    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for s in range(steps):
        loss, grads = step(model, *batches(s))
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(float(loss))
    return float(np.mean(losses[-20:]))


def test_no_causal_mask_leaks_the_future():
    batches = markov_batches()
    masked = make()
    masked_loss = train(masked, batches, 80)
    leaky = make(causal=False)
    leaky_loss = train(leaky, batches, 80)
    assert leaky_loss < 0.5 * masked_loss  # reads the next token instead of predicting it
    x, y = batches(99_999)
    as_generated = float(nn.losses.cross_entropy(leaky(x, mask="causal"), y).mean())
    honest = float(nn.losses.cross_entropy(masked(x), y).mean())
    assert as_generated > 2 * honest  # without the future to copy, it has learned nothing useful


def test_no_positional_encoding_still_orders_through_the_mask():
    K = 3
    batches = copy_batches(K)
    model = make(positional="none", vocab_size=12)
    train(model, batches, 400)
    x, y = batches(99_999)
    pred = np.array(model(x).argmax(-1))[:, K:]
    acc = float((pred == np.array(y)[:, K:]).mean())
    assert acc > 0.8, acc


def test_deep_stack_needs_residuals():
    batches = markov_batches()
    with_res = train(make(num_layers=6), batches, 80)
    without = train(make(num_layers=6, residual=False), batches, 80)
    assert without > with_res + 1.0, (with_res, without)


def _usage_cv(model: Model, x: mx.array) -> float:
    model(x)
    cvs = []
    for layer in model.layers:
        share = np.bincount(np.array(layer.ffn.last_route[0]).ravel(), minlength=8) / x.size
        cvs.append(share.std() / share.mean())
    return float(np.mean(cvs))


def test_load_balancing_loss_evens_expert_use():
    batches = markov_batches()
    x, _ = batches(99_999)
    cvs = {}
    for aux in (0.0, 0.5):
        model = make(ffn="moe", num_experts=8, top_k=1, intermediate_size=32)
        train(model, batches, 100, lr=1e-2, aux=aux)
        cvs[aux] = _usage_cv(model, x)
    assert cvs[0.5] < 0.6 * cvs[0.0], cvs
