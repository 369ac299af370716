"""Pretraining the teaching model from scratch: a SentencePiece tokenizer, then full backprop.

`pretrain(PretrainConfig(data=folder, out=folder, preset="nano"))` yields `PretrainEvent`s and
leaves a folder `engine.load` opens like any model: config.json (model_type "tiny"),
model.safetensors, tokenizer.model (SentencePiece BPE with PAD=0, UNK=1, BOS=2, EOS=3, the chat
markers and "\\n" as atomic pieces, byte fallback optional) and tokenizer_config.json with a chat
template.

Data: every .txt/.md file under the folder is one document, encoded as BOS + text + EOS; the
last `val_fraction` of each document's tokens is held out. Training samples random windows of
`seq_len + 1` tokens; the loss is cross-entropy (−log p of each next token) plus, for MoE, the
load-balancing loss times `aux_loss_coef`. AdamW with warmup and cosine decay, gradients
clipped to norm 1; the weights with the best validation loss are the ones saved (a corpus of a
few tens of KB overfits). `unigram_perplexity` is the baseline a model must beat: next-token
probabilities from training-token frequencies alone (add-one smoothed).

The fine-tune trainer (engine/train/trainer.py) is built around a loaded checkpoint and adapters;
this loop is its own, small and for a model built here. It knows nothing about front ends.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from engine.errors import TrainingError
from engine.models.tiny import Model, ModelArgs

PAD, UNK, BOS, EOS = 0, 1, 2, 3
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Sized for a laptop CPU: "nano" trains in about a minute, "small" in a few.
PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        vocab_size=320,
        seq_len=48,
        batch_size=16,
        steps=200,
        lr=4e-3,
    ),
    "nano": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        vocab_size=512,
        seq_len=64,
        batch_size=16,
        steps=300,
        lr=3e-3,
    ),
    "small": dict(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=512,
        vocab_size=1024,
        seq_len=128,
        batch_size=16,
        steps=1000,
        lr=2e-3,
    ),
    "nano-moe": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        vocab_size=512,
        seq_len=64,
        batch_size=16,
        steps=500,
        lr=3e-3,
        ffn="moe",
        num_experts=4,
        top_k=2,
    ),
    "nano-mla": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        vocab_size=512,
        seq_len=64,
        batch_size=16,
        steps=500,
        lr=3e-3,
        attention="mla",
        kv_lora_rank=16,
    ),
}
_LOOP_KEYS = ("seq_len", "batch_size", "steps", "lr")


@dataclass
class PretrainConfig:
    data: str
    out: str
    preset: str = "nano"
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelArgs or loop key
    byte_fallback: bool = False
    val_fraction: float = 0.1
    eval_every: int = 50
    seed: int = 0
    warmup: int = 20


@dataclass
class PretrainEvent:
    step: int
    total: int
    loss: float
    val_loss: float | None = None
    tokens_per_s: float = 0.0
    done: bool = False
    out: str | None = None
    unigram_ppl: float | None = None


def read_texts(folder: str | Path) -> list[str]:
    root = Path(folder)
    if not root.is_dir():
        raise TrainingError(f"{root}: not a folder")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file()
    )
    texts = [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]
    texts = [t for t in texts if t]
    if not texts:
        raise TrainingError(f"{root}: no .txt or .md files with text")
    return texts


def train_tokenizer(
    texts: list[str], out: Path, vocab_size: int, byte_fallback: bool = False
) -> Path:
    """SentencePiece BPE on `texts` (identity normalisation, so decode(encode(t)) == t).

    `vocab_size` is raised when the text's characters (plus 256 bytes with byte fallback and the
    special pieces) would not fit, leaving room for 32 merges."""
    import io

    import sentencepiece as spm

    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    chars = {c for line in lines for c in line}
    required = len(chars) + 4 + 1 + len(CHAT_MARKERS) + (256 if byte_fallback else 0)
    vocab_size = max(vocab_size, required + 32)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="bpe",
            pad_id=PAD,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            byte_fallback=byte_fallback,
            user_defined_symbols=["\n", *CHAT_MARKERS],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=1.0,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TrainingError(f"tokenizer training failed: {str(e).splitlines()[0]}") from None
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 4096,
            },
            indent=2,
        )
    )
    return path


def split_ids(docs: list[list[int]], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    train, val = [], []
    for d in docs:
        cut = len(d) - max(2, int(len(d) * val_fraction))
        train.extend(d[:cut])
        val.extend(d[cut:])
    return np.array(train, np.int32), np.array(val, np.int32)


def val_chunks(val: np.ndarray, seq_len: int) -> np.ndarray:
    n = max(1, len(val) // (seq_len + 1))
    usable = val[: n * (seq_len + 1)]
    if len(usable) < 2:
        raise TrainingError("validation text too short")
    return usable.reshape(n, -1) if len(usable) == n * (seq_len + 1) else usable[None]


def unigram_perplexity(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[targets].mean()))


def lm_loss(model: Model, x: mx.array, y: mx.array) -> mx.array:
    ce = nn.losses.cross_entropy(model(x), y).mean()
    if model.args.ffn == "moe":
        ce = ce + model.args.aux_loss_coef * model.aux_loss()
    return ce


def evaluate(model: Model, chunks: np.ndarray) -> float:
    """Mean next-token cross-entropy over the validation chunks."""
    total, n = 0.0, 0
    for row in chunks:
        x, y = mx.array(row[None, :-1]), mx.array(row[None, 1:])
        loss = nn.losses.cross_entropy(model(x), y, reduction="sum")
        total += float(loss)
        n += y.size
    return total / n


def resolve(config: PretrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelArgs keys, loop keys) from the preset plus overrides."""
    if config.preset not in PRESETS:
        raise TrainingError(f"preset {config.preset!r}: expected one of {', '.join(PRESETS)}")
    merged = {**PRESETS[config.preset], **config.overrides}
    loop = {k: merged.pop(k) for k in _LOOP_KEYS}
    known = set(ModelArgs.__dataclass_fields__)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise TrainingError(f"unknown model setting {unknown[0]!r}")
    return merged, loop


def pretrain(
    config: PretrainConfig, cancel: threading.Event | None = None
) -> Iterator[PretrainEvent]:
    import sentencepiece as spm

    design, loop = resolve(config)
    out = Path(config.out)
    texts = read_texts(config.data)
    sp_path = train_tokenizer(texts, out, design["vocab_size"], config.byte_fallback)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    vocab = sp.vocab_size()
    design["vocab_size"] = vocab
    design.setdefault("max_position_embeddings", max(512, loop["seq_len"]))
    docs = [[BOS, *sp.encode(t), EOS] for t in texts]
    train_ids, val_ids = split_ids(docs, config.val_fraction)
    L = loop["seq_len"]
    if len(train_ids) <= L + 1:
        raise TrainingError(
            f"{config.data}: only {len(train_ids)} training tokens; need more than seq_len={L}"
        )
    chunks = val_chunks(val_ids, L)
    baseline = unigram_perplexity(train_ids, chunks[:, 1:].reshape(-1), vocab)

    mx.random.seed(config.seed)
    rng = np.random.default_rng(config.seed)
    try:
        args = ModelArgs(**design)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"bad model setting: {e}") from None
    model = Model(args)
    mx.eval(model.parameters())
    steps = loop["steps"]
    warm = min(config.warmup, steps)
    sched = optim.join_schedules(
        [
            optim.linear_schedule(loop["lr"] / 10, loop["lr"], warm),
            optim.cosine_decay(loop["lr"], max(1, steps - warm), loop["lr"] / 10),
        ],
        [warm],
    )
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)
    grad_fn = nn.value_and_grad(model, lm_loss)

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(x, y):
        loss, grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    t0, seen, val = time.perf_counter(), 0, None
    best, best_params, step, loss = math.inf, None, 0, mx.array(math.nan)
    for step in range(1, steps + 1):
        if cancel is not None and cancel.is_set():
            break
        starts = rng.integers(0, len(train_ids) - L - 1, size=loop["batch_size"])
        batch = np.stack([train_ids[s : s + L + 1] for s in starts])
        loss = step_fn(mx.array(batch[:, :-1]), mx.array(batch[:, 1:]))
        mx.eval(loss, state)
        seen += batch[:, 1:].size
        val = None
        if step % config.eval_every == 0 or step == steps:
            val = evaluate(model, chunks)
            if val < best:  # updates replace arrays, so holding these keeps a snapshot
                best, best_params = val, tree_flatten(model.parameters())
        yield PretrainEvent(
            step, steps, float(loss), val, seen / (time.perf_counter() - t0), unigram_ppl=baseline
        )
    if best_params is not None:  # a small corpus overfits: keep the best validation weights
        model.load_weights(best_params)
    save(model, out, sp)
    final = evaluate(model, chunks)
    yield PretrainEvent(
        step, steps, float(loss), final, seen / (time.perf_counter() - t0), True, str(out), baseline
    )


def save(model: Model, out: Path, sp: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    cfg = {
        **asdict(model.args),
        "bos_token_id": BOS,
        "eos_token_id": [EOS, sp.piece_to_id("<|end|>")],
        "pad_token_id": PAD,
        "unk_token_id": UNK,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": BOS,
                "eos_token_id": cfg["eos_token_id"],
                "temperature": 0.8,
                "top_p": 0.95,
            },
            indent=2,
        )
    )


def default_corpus() -> Path:
    """The bundled teaching text (resources/corpus)."""
    return Path(__file__).resolve().parents[2] / "resources" / "corpus"


def perplexity_of(value: float | None) -> float:
    return math.exp(value) if value is not None else float("nan")
