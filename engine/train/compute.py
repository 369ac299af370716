"""How training computes, apart from what it computes: gradient checkpointing of decoder layers,
and fp32 GEMMs on dequantized weights for frozen quantized layers where that is faster.

Both swap the class of existing module instances for a subclass with another `__call__` (and swap
it back), so parameter names, saved files and the model's code stay untouched. Neither knows
about data, optimizers or adapters' formats.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.train import lora as L


def _checkpointed_call(orig):
    def call(self, x, *args, **kwargs):
        def inner(params, x):
            self.update(params)
            return orig(self, x, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return call


def set_grad_checkpoint(model: nn.Module, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them."""
    for layer in model.layers:
        cls = type(layer)
        base = getattr(cls, "_ckpt_base", None)
        if on and base is None:
            layer.__class__ = type(
                cls.__name__,
                (cls,),
                {"__call__": _checkpointed_call(cls.__call__), "_ckpt_base": cls},
            )
        elif not on and base is not None:
            layer.__class__ = base


_DEQUANT: dict[int, mx.array] = {}


class _CachedHeadEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return x @ _DEQUANT[id(self)].T


class _CachedHeadLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return x @ _DEQUANT[id(self)].T


class _DequantLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < 16:
            return super().__call__(x)
        w = mx.dequantize(
            self.weight,
            self.scales,
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        y = x @ w.astype(x.dtype).T
        return y + self.bias if "bias" in self else y


_SWAPPED = (_CachedHeadEmbedding, _CachedHeadLinear, _DequantLinear)


def dequantized_compute(model: nn.Module, on: bool) -> int:
    """While training on the CPU with an optimised BLAS, run frozen quantized linears as fp32 GEMMs
    on dequantized weights (MLX's CPU quantized matmul is ~10-20x slower there); the output head
    (tied embedding or lm_head, the largest matmul) is dequantized once and kept. Stored weights
    stay quantized. Returns the bytes of the kept copy. `on=False` undoes it."""
    held = 0
    for name, m in model.named_modules():
        if not on:
            if type(m) in _SWAPPED:
                m.__class__ = m.__class__.__mro__[1]
                _DEQUANT.pop(id(m), None)
            continue
        if not L.dequantize_for_matmul():
            break
        head = (
            type(m) is nn.QuantizedEmbedding
            and name.endswith("embed_tokens")
            and "lm_head" not in model
        ) or (type(m) is nn.QuantizedLinear and name == "lm_head")
        if head:
            w = mx.dequantize(
                m.weight,
                m.scales,
                m.get("biases"),
                group_size=m.group_size,
                bits=m.bits,
                mode=m.mode,
            ).astype(mx.float32)
            mx.eval(w)
            _DEQUANT[id(m)] = w
            m.__class__ = (
                _CachedHeadEmbedding if isinstance(m, nn.QuantizedEmbedding) else _CachedHeadLinear
            )
            held += w.nbytes
        elif type(m) is nn.QuantizedLinear:
            m.__class__ = _DequantLinear
    return held
