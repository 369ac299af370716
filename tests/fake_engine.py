"""A stand-in for `engine.session.Engine` with the same public surface (docs/API.md).

It yields canned tokens with a small delay so GUI tests can watch streaming, stopping,
regenerating and errors without loading a model. It stands in for the engine only; the GUI
under test is always the real one. Each chat call's reply is numbered ("Reply 1", "Reply 2"...)
so a test can tell a regenerated answer from the one it replaced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from engine.errors import ContextLengthError, ModelLoadError


@dataclass
class FakeInfo:
    name: str = "FakeLM-1M"
    path: str = "/fake/FakeLM-1M.gguf"
    model_type: str = "llama"
    n_params: int = 134_515_008
    weight_bytes: int = 98_000_000
    context_length: int = 8192
    quantization: str = "Q4_1"
    adapter: str | None = None
    dtype: str = "float32"


@dataclass
class FakeStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str = "stop"
    template_fallback: bool = False


@dataclass
class FakeEvent:
    text: str
    token_id: int
    done: bool = False
    stats: FakeStats | None = None


@dataclass
class FakeEngine:
    tokens: list[str] = field(
        default_factory=lambda: [
            "Here",
            " is",
            " a",
            " short",
            " answer",
            ".\n\n",
            "```python\n",
            "print('hi')\n",
            "```\n",
            "Done",
            ".",
        ]
    )
    delay: float = 0.02
    load_delay: float = 0.2
    context_length: int = 8192
    chat_error: Exception | None = None
    calls: list[list[dict]] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    numbered: bool = True  # prefix each reply with "Reply N:"

    def __post_init__(self) -> None:
        self._cancel = threading.Event()
        self._info: FakeInfo | None = None
        self.loaded: Any = None
        self.n_chats = 0
        self.yielded = 0  # tokens yielded by the current chat() call
        self.yielded_at_cancel: int | None = None

    # ---- model ---------------------------------------------------------------------------
    def load(self, path: str, adapter: str | None = None) -> FakeInfo:
        time.sleep(self.load_delay)
        if "broken" in str(path):
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        name = str(path).rsplit("/", 1)[-1].split(".")[0]
        self._info = FakeInfo(
            name=name, path=str(path), adapter=adapter, context_length=self.context_length
        )
        import mlx.core as mx

        self.loaded = SimpleNamespace(model=_TinyModel(mx))
        return self._info

    def info(self) -> FakeInfo | None:
        return self._info

    def unload(self) -> None:
        self._info = None
        self.loaded = None

    def set_adapter(self, path: str | None) -> None:
        if self._info is None:
            raise ModelLoadError("no model is loaded")
        self._info.adapter = path

    def generation_defaults(self) -> Any:
        try:
            from engine.sampling import SamplingParams

            return SamplingParams(temperature=0.2, top_p=0.9, max_tokens=256)
        except ImportError:
            return SimpleNamespace(
                temperature=0.2,
                top_p=0.9,
                top_k=0,
                min_p=0.0,
                repetition_penalty=1.0,
                max_tokens=256,
                seed=None,
            )

    def count_tokens(self, messages: list[dict]) -> int:
        return sum(len(m["content"].split()) + 4 for m in messages)

    # ---- generation ----------------------------------------------------------------------
    def cancel(self) -> None:
        self.yielded_at_cancel = self.yielded
        self._cancel.set()

    def chat(self, messages: list[dict], params: Any = None) -> Iterator[FakeEvent]:
        if self._info is None:
            raise ModelLoadError("no model is loaded")
        self.calls.append([dict(m) for m in messages])
        self.params.append(params)
        self._cancel.clear()
        self.yielded, self.yielded_at_cancel = 0, None
        self.n_chats += 1
        if self.chat_error is not None:
            raise self.chat_error
        prompt_tokens = self.count_tokens(messages)
        if prompt_tokens >= self.context_length:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens does not fit the context of {self.context_length}"
            )
        max_tokens = int(getattr(params, "max_tokens", 512) or 512)
        words = ([f"Reply {self.n_chats}:", " "] if self.numbered else []) + list(self.tokens)
        t0 = time.perf_counter()
        ttft = None
        reason = "stop"
        n = 0
        for i, w in enumerate(words):
            if self._cancel.is_set():
                reason = "cancelled"
                break
            if n >= max_tokens:
                reason = "length"
                break
            if prompt_tokens + n >= self.context_length:
                reason = "context"
                break
            time.sleep(self.delay)
            ttft = ttft or time.perf_counter() - t0
            n += 1
            self.yielded += 1
            yield FakeEvent(text=w, token_id=100 + i)
        elapsed = max(time.perf_counter() - t0, 1e-6)
        stats = FakeStats(
            prompt_tokens=prompt_tokens,
            generated_tokens=n,
            ttft_s=ttft or 0.0,
            prefill_tps=prompt_tokens / max(ttft or 1e-3, 1e-3),
            decode_tps=n / elapsed,
            peak_memory_bytes=5_000_000,
            finish_reason=reason,
        )
        yield FakeEvent(text="", token_id=-1, done=True, stats=stats)

    def complete(self, prompt: str, params: Any = None) -> Iterator[FakeEvent]:
        """Raw-text continuation: the same canned reply (the server's /v1/completions)."""
        return self.chat([{"role": "user", "content": prompt}], params)


class CharTokenizer:
    """One token per character (ids modulo the vocabulary), for the teaching model below."""

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % self.vocab for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(int(i)) for i in ids)


@dataclass
class TeachingEngine(FakeEngine):
    """The fake engine holding a real model: engine/models/tiny.py (random weights) with a
    character tokenizer, so the Inspector's look/check-the-math run the real engine code."""

    ffn: str = "moe"
    n_layers: int = 3

    def load(self, path: str, adapter: str | None = None) -> FakeInfo:
        info = super().load(path, adapter)
        import mlx.core as mx

        from engine.models.tiny import Model, ModelArgs

        mx.random.seed(0)
        args = ModelArgs(
            vocab_size=128,
            hidden_size=32,
            num_layers=self.n_layers,
            num_heads=4,
            intermediate_size=64,
            ffn=self.ffn,
            num_experts=6,
            top_k=2,
        )
        model = Model(args)
        from mlx.utils import tree_flatten

        params = [a for _, a in tree_flatten(model.parameters())]
        info.n_params = sum(a.size for a in params)
        info.weight_bytes = sum(a.nbytes for a in params)
        info.quantization, info.model_type, info.context_length = "", "tiny", 512
        self.loaded = SimpleNamespace(model=model, tokenizer=CharTokenizer(), config={})
        return info


class _TinyModel:
    """Just enough of an MLX module for the inspector: a nested parameter tree."""

    def __init__(self, mx: Any) -> None:
        self._p = {
            "embed_tokens": {"weight": mx.zeros((32, 8))},
            "layers": [{"self_attn": {"q_proj": {"weight": mx.zeros((8, 8))}}}],
            "norm": {"weight": mx.ones((8,))},
        }

    def parameters(self) -> dict:
        return self._p


def make_window(
    qtbot: Any, db_path: Any, engine: FakeEngine | None = None, load: bool = True, **kwargs: Any
) -> Any:
    """A real MainWindow over `engine` (a FakeEngine by default), the model loaded."""
    from app.gui.main_window import MainWindow
    from app.store import Store

    engine = engine or FakeEngine()
    win = MainWindow(store=Store(db_path), engine_factory=lambda: engine, autoload=False, **kwargs)
    qtbot.addWidget(win)
    win.engine = engine
    win.show()
    win.activateWindow()
    qtbot.waitExposed(win)
    if load:
        with qtbot.waitSignal(win.client.loaded, timeout=5000):
            win.load_model("/fake/FakeLM-1M.gguf")
    return win
