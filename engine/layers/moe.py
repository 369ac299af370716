"""Mixture of experts: the router's math, stacked ("switch") experts, and the MoE block.

- `route(logits, ...)` is the router as a pure function: scores (softmax or sigmoid), expert
  selection (`greedy`, `group_limited_greedy`, `noaux_tc`; the correction bias only steers the
  selection, never the weights), normalisation and `routed_scaling_factor`.
- `SwitchLinear` holds one linear per expert stacked as (E, out, in) and applies them with
  `mx.gather_mm` (or `mx.gather_qmm` once quantized) over token-expert pairs sorted by expert:
  no Python loop over experts or tokens.
- `MoE` is the DeepSeek-style block (`gate`, `switch_mlp`, optional `shared_experts`); the
  Mixtral and Qwen2-MoE blocks in their model files reuse `route` and `SwitchGLU`.
- `RouterCapture` records the router's choices for the inspector when set on a model
  (`model.capture = RouterCapture()`); `None` (the default) costs nothing.

This module does not know checkpoint layouts: model files stack per-expert tensors in `sanitize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from engine.layers.mlp import activation

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterSpec:
    """Everything that changes the router's math, read from a checkpoint's config."""

    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # DeepSeek-V2's reference code scales only un-normalised weights; V3 scales after normalising.
    scale_normalized: bool = True

    def __post_init__(self) -> None:
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(
                f"topk_method {self.topk_method!r}; expected one of {', '.join(TOPK_METHODS)}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(
                f"scoring_func {self.scoring_func!r}; expected one of {', '.join(SCORING_FUNCS)}"
            )


def _topk_indices(x: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries along the last axis (unordered)."""
    return mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]


def _keep_best_groups(choice: mx.array, spec: RouterSpec) -> mx.array:
    """Set every expert outside the `topk_group` best of `n_group` groups to -inf."""
    n, e = choice.shape
    grouped = choice.reshape(n, spec.n_group, e // spec.n_group)  # (N, G, E/G)
    if spec.topk_method == "noaux_tc":
        # V3: a group is as good as the sum of its two best (bias-corrected) experts
        best2 = mx.take_along_axis(
            grouped, _topk_indices(grouped, min(2, e // spec.n_group)), axis=-1
        )
        group_scores = best2.sum(axis=-1)
    else:
        group_scores = grouped.max(axis=-1)  # V2: a group is as good as its best expert
    drop = mx.argpartition(group_scores, kth=spec.n_group - spec.topk_group - 1, axis=-1)
    drop = drop[:, : spec.n_group - spec.topk_group]  # (N, G - topk_group) worst groups
    grouped = mx.put_along_axis(
        grouped, drop[..., None], mx.array(-float("inf"), choice.dtype), axis=1
    )
    return grouped.reshape(n, e)


def route(
    logits: mx.array, spec: RouterSpec, bias: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Router logits (N, E) -> (expert ids (N, k) int32, weights (N, k) fp32).

    Selection uses `scores + bias` (DeepSeek-V3's `e_score_correction_bias`); weights are the
    unbiased scores of the chosen experts.
    """
    logits = logits.astype(mx.float32)
    if spec.scoring_func == "softmax":
        scores = mx.softmax(logits, axis=-1, precise=True)
    else:
        scores = mx.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(mx.float32)
    if spec.topk_method != "greedy" and spec.n_group > 1 and spec.topk_group < spec.n_group:
        choice = _keep_best_groups(choice, spec)
    inds = _topk_indices(choice, spec.top_k)
    weights = mx.take_along_axis(scores, inds, axis=-1)
    normalize = spec.norm_topk_prob and spec.top_k > 1
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    if spec.routed_scaling_factor != 1.0 and (spec.scale_normalized or not normalize):
        weights = weights * spec.routed_scaling_factor
    return inds.astype(mx.int32), weights


class RouterCapture:
    """Router choices per MoE call: `records` holds (layer, ids (B, L, k), weights (B, L, k))."""

    def __init__(self) -> None:
        self.records: list[tuple[int, mx.array, mx.array]] = []

    def add(self, layer: int, inds: mx.array, weights: mx.array) -> None:
        self.records.append((layer, inds, weights))

    def by_layer(self) -> dict[int, list[tuple[mx.array, mx.array]]]:
        out: dict[int, list[tuple[mx.array, mx.array]]] = {}
        for layer, inds, weights in self.records:
            out.setdefault(layer, []).append((inds, weights))
        return out

    def clear(self) -> None:
        self.records.clear()


# ---------------------------------------------------------------------------- stacked experts


def _gather_sort(x: mx.array, inds: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Token-expert pairs sorted by expert: x rows (N·k, 1, D), expert ids (N·k,), inverse order."""
    k = inds.shape[-1]
    flat = inds.flatten()
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    return x[order // k], flat[order], inv


# Below this many token-expert pairs the unsorted gather is cheaper than sorting (decode).
SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    """E linears stacked: weight (E, out, in), optional bias (E, out)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x (..., 1, in), indices (...) -> (..., 1, out) with expert indices[...] applied."""
        y = mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """SwitchLinear with MLX affine-quantized weights (`weight` uint32, `scales`, `biases`)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, self.biases = mx.quantize(w, group_size, bits)
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y

    @classmethod
    def from_switch_linear(
        cls, layer: SwitchLinear, group_size: int = 64, bits: int = 4, mode: str = "affine"
    ):
        e, out_dims, in_dims = layer.weight.shape
        ql = cls(in_dims, out_dims, e, "bias" in layer, group_size, bits, mode)
        ql.weight, ql.scales, ql.biases = mx.quantize(layer.weight, group_size, bits)
        if "bias" in layer:
            ql.bias = layer.bias
        return ql


class SwitchGLU(nn.Module):
    """Routed SwiGLU experts: down(act(gate(x)) * up(x)) with each token's k experts."""

    def __init__(
        self, dims: int, hidden_dims: int, num_experts: int, act: str = "silu", bias: bool = False
    ):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts, bias)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts, bias)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts, bias)
        self._act = activation(act)

    def __call__(self, x: mx.array, inds: mx.array) -> mx.array:
        """x (N, D), inds (N, k) -> (N, k, D): every token through each of its k experts."""
        n, k = inds.shape
        do_sort = inds.size >= SORT_THRESHOLD
        if do_sort:
            xs, idx, inv = _gather_sort(x, inds)
            xs = mx.expand_dims(xs, -2)  # (N·k, 1, D)
        else:
            xs, idx = x[:, None, None, :], inds  # (N, 1, 1, D) broadcast over k
        h = self._act(self.gate_proj(xs, idx, do_sort)) * self.up_proj(xs, idx, do_sort)
        y = self.down_proj(h, idx, do_sort).squeeze(-2)  # (N·k, D) or (N, k, D)
        if do_sort:
            y = y[inv].reshape(n, k, -1)
        return y


def combine(expert_out: mx.array, weights: mx.array) -> mx.array:
    """Weighted sum over each token's experts: (N, k, D), (N, k) -> (N, D)."""
    return (expert_out * weights[..., None].astype(expert_out.dtype)).sum(axis=-2)


# ---------------------------------------------------------------------------- DeepSeek block


class MoEGate(nn.Module):
    """DeepSeek router weights: `weight` (E, D) and, for noaux_tc, `e_score_correction_bias` (E,)."""

    def __init__(self, dims: int, num_experts: int, correction_bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((num_experts, dims))
        if correction_bias:
            self.e_score_correction_bias = mx.zeros((num_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        # router logits in fp32 whatever the compute dtype (as the reference does)
        return x.astype(mx.float32) @ self.weight.astype(mx.float32).T


class MoE(nn.Module):
    """Shared experts (always on) + routed experts weighted by the router (DeepSeek V2/V3)."""

    def __init__(
        self,
        dims: int,
        moe_hidden: int,
        num_experts: int,
        spec: RouterSpec,
        n_shared_experts: int | None = None,
        act: str = "silu",
        layer_idx: int = 0,
        correction_bias: bool = False,
        shared_cls: Any = None,
    ):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self._capture: RouterCapture | None = None
        self.gate = MoEGate(dims, num_experts, correction_bias)
        self.switch_mlp = SwitchGLU(dims, moe_hidden, num_experts, act)
        if n_shared_experts:
            self.shared_experts = shared_cls(dims, moe_hidden * n_shared_experts, act=act)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        inds, weights = route(self.gate(flat), self.spec, self.gate.get("e_score_correction_bias"))
        if self._capture is not None:
            self._capture.add(
                self.layer_idx, inds.reshape(*shape[:-1], -1), weights.reshape(*shape[:-1], -1)
            )
        y = combine(self.switch_mlp(flat, inds), weights).reshape(shape)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y


def set_capture(model: nn.Module, capture: RouterCapture | None) -> None:
    """Point every MoE block of `model` at `capture` (None turns recording off)."""
    for _, module in model.named_modules():
        if hasattr(module, "_capture"):
            module._capture = capture


def stack_experts(
    weights: dict[str, mx.array],
    prefix: str,
    n_experts: int,
    names: dict[str, str],
    out_prefix: str,
    suffixes: tuple[str, ...] = ("weight", "scales", "biases", "bias"),
) -> None:
    """Replace `{prefix}.experts.{i}.{src}.{suffix}` by `{out_prefix}.{dst}.{suffix}` stacked (E, ...).

    `names` maps per-expert module names to stacked ones (e.g. {"w1": "gate_proj"}). A missing
    expert tensor raises KeyError naming it; callers turn that into a ModelLoadError.
    """
    for src, dst in names.items():
        for suffix in suffixes:
            first = f"{prefix}.experts.0.{src}.{suffix}"
            if first not in weights:
                continue
            keys = [f"{prefix}.experts.{i}.{src}.{suffix}" for i in range(n_experts)]
            missing = [key for key in keys if key not in weights]
            if missing:
                raise KeyError(missing[0])
            weights[f"{out_prefix}.{dst}.{suffix}"] = mx.stack([weights.pop(key) for key in keys])
