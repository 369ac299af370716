"""QObject workers: every engine call runs off the GUI thread and reports plain data.

`EngineClient` owns one long-lived thread for the engine. The engine is created, loaded and
asked to generate on that same thread: MLX streams belong to the thread that made them, so
loading on one thread and generating on another would fail. The GUI talks to it with queued
signals and hears back `token`, `finished` and `failed`; `cancel()` is called from the GUI
thread and sets a flag the worker checks at every step (and calls the engine's own cancel).

`run_task` runs any other blocking call (Hub search, downloads of the default model, dataset
reports, training) on a short-lived thread, optionally iterating a generator with a cancel flag.
This module knows nothing about widgets.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_tokens",
    "seed",
)


def plain(obj: Any) -> dict:
    """A dataclass / namespace / dict as a plain dict (what signals carry)."""
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return dict(obj)
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def error_text(exc: BaseException) -> str:
    """One line for the banner: a LatentError's own message, else the type and message."""
    try:
        from engine.errors import LatentError
    except ImportError:  # pragma: no cover - errors.py is part of the skeleton
        LatentError = Exception  # noqa: N806
    if isinstance(exc, LatentError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def default_engine_factory() -> Any:
    """The real engine; imported lazily (and on the engine thread) so the app opens without it."""
    try:
        module = importlib.import_module("engine.session")
    except ImportError as e:
        raise RuntimeError(f"the engine is not available yet ({e})") from e
    return module.Engine()


def make_params(values: dict) -> Any:
    """`engine.sampling.SamplingParams` from a dict of GUI settings (unknown keys dropped)."""
    clean = {k: v for k, v in values.items() if k in SAMPLING_KEYS}
    if clean.get("seed") is not None and int(clean["seed"]) < 0:
        clean["seed"] = None
    try:
        from engine.sampling import SamplingParams
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(**clean)
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in clean.items() if k in names})


def n_experts_of(model: Any) -> int:
    """Routed experts per MoE layer from the model's args (0 when it names none)."""
    args = getattr(model, "args", None)
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        n = getattr(args, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return 0


class EngineWorker(QObject):
    """Lives on the engine thread; every slot runs there."""

    loaded = Signal(object)  # dict: info + "defaults"
    load_failed = Signal(str)
    unloaded = Signal()
    token = Signal(int, str)  # request id, new text
    finished = Signal(int, object)  # request id, dict of stats (+ "context_used")
    failed = Signal(int, str)
    counted = Signal(int, int)  # tag (e.g. a conversation id), tokens
    inspected = Signal(object)  # {"rows": [(name, shape, format, bytes, part)], "summary": {}}
    looked = Signal(object)  # {"tokens", "top_next", "attention", "router", ...} or {"error"}
    checked = Signal(
        object
    )  # {"rows": [(name, max_abs, scale)], "max_abs", "dtype", ...} or {"error"}

    def __init__(self, factory: Callable[[], Any]) -> None:
        super().__init__()
        self._factory = factory
        self.engine: Any = None
        self.cancel_flag = threading.Event()
        self.gui_generating = False  # True while a GUI chat (not a server job) runs here

    def _engine(self) -> Any:
        if self.engine is None:
            self.engine = self._factory()
        return self.engine

    def _info(self) -> dict:
        eng = self._engine()
        info = plain(eng.info())
        try:
            info["defaults"] = {
                k: v for k, v in plain(eng.generation_defaults()).items() if k in SAMPLING_KEYS
            }
        except Exception:  # a model without generation_config.json: keep GUI defaults
            info["defaults"] = {}
        return info

    @Slot(str, object)
    def load(self, path: str, adapter: object) -> None:
        try:
            self._engine().load(path, adapter=adapter or None)
            self.loaded.emit(self._info())
        except Exception as e:  # noqa: BLE001 - every failure goes to the banner
            self.load_failed.emit(error_text(e))

    @Slot()
    def unload(self) -> None:
        try:
            if self.engine is not None:
                self.engine.unload()
        finally:
            self.unloaded.emit()

    @Slot(object)
    def set_adapter(self, path: object) -> None:
        try:
            self._engine().set_adapter(path or None)
            self.loaded.emit(self._info())
        except Exception as e:  # noqa: BLE001
            self.load_failed.emit(error_text(e))

    @Slot(int, object, object)
    def generate(self, req: int, messages: object, params: object) -> None:
        # the flag was cleared when this request was made: a Stop pressed while the request
        # waited behind a load must still count
        stats: dict = {}
        text = []
        gen = None
        self.gui_generating = True
        try:
            eng = self._engine()
            gen = eng.chat(list(messages), make_params(dict(params)))
            for ev in gen:
                if self.cancel_flag.is_set():
                    stats = {"finish_reason": "cancelled"}
                    break
                if getattr(ev, "text", ""):
                    text.append(ev.text)
                    self.token.emit(req, ev.text)
                if getattr(ev, "done", False):
                    stats = plain(getattr(ev, "stats", None))
                    break
        except Exception as e:  # noqa: BLE001
            self.failed.emit(req, error_text(e))
            return
        finally:
            self.gui_generating = False
            if gen is not None and hasattr(gen, "close"):
                gen.close()
        try:
            full = list(messages) + [{"role": "assistant", "content": "".join(text)}]
            stats["context_used"] = int(self.engine.count_tokens(full))
        except Exception:  # noqa: BLE001 - the meter falls back to the stats' own counts
            stats["context_used"] = int(stats.get("prompt_tokens", 0)) + int(
                stats.get("generated_tokens", len(text))
            )
        self.finished.emit(req, stats)

    @Slot(object)
    def run_job(self, job: object) -> None:
        """A generation asked for by another thread (the local server); see `app.gui.serving`.

        Runs here, on the engine thread, so it is serialised with the window's own chats."""
        job.run(self._engine())  # type: ignore[attr-defined]

    @Slot(int, object)
    def count(self, tag: int, messages: object) -> None:
        try:
            if self.engine is not None and self.engine.info() is not None:
                self.counted.emit(tag, int(self.engine.count_tokens(list(messages))))
        except Exception:  # noqa: BLE001 - the meter is a hint, never an error
            pass

    @Slot()
    def inspect(self) -> None:
        """The parameter table: `engine.inspect.storage` when it exists, else tree_flatten."""
        out: dict = {"rows": [], "summary": {}}
        loaded = getattr(self.engine, "loaded", None) or getattr(self.engine, "_loaded", None)
        model = getattr(loaded, "model", None)
        if model is None:
            self.inspected.emit(out)
            return
        try:
            from engine.inspect import storage

            st = storage(loaded)
            out["rows"] = [
                (r.name, tuple(r.shape), r.format, int(r.bytes), r.part) for r in st.rows
            ]
            out["summary"] = {
                k: getattr(st, k)
                for k in (
                    "totals",
                    "total_bytes",
                    "n_layers",
                    "n_heads",
                    "kv_bytes_per_token",
                    "kv_bytes_per_token_full",
                    "kv_kind",
                )
            }
        except Exception:  # noqa: BLE001 - no engine.inspect yet, or a model it cannot read
            try:
                from mlx.utils import tree_flatten

                out["rows"] = [
                    (name, tuple(a.shape), str(a.dtype).replace("mlx.core.", ""), int(a.nbytes), "")
                    for name, a in tree_flatten(model.parameters())
                ]
            except Exception as e:  # noqa: BLE001
                out["rows"] = [("error", (), error_text(e), 0, "")]
        self.inspected.emit(out)

    @Slot(str)
    def look(self, prompt: str) -> None:
        """One prompt through the model with `engine.inspect.look` (attention, next tokens)."""
        try:
            from engine.inspect import look

            loaded = getattr(self.engine, "loaded", None)
            if loaded is None:
                raise RuntimeError("no model is loaded")
            r = look(loaded, prompt, top_k=10, router=True)
            self.looked.emit(
                {
                    "tokens": r.tokens,
                    "top_next": r.top_next,
                    "attention": r.attention,
                    "router": dict(r.router),  # layer -> (expert ids (L, k), weights (L, k))
                    "n_experts": n_experts_of(loaded.model),
                    "residual_norms": r.residual_norms,
                }
            )
        except Exception as e:  # noqa: BLE001
            self.looked.emit({"error": error_text(e)})

    @Slot(str)
    def check_math(self, prompt: str) -> None:
        """`engine.inspect.check_math`: the engine vs a float64 numpy forward, per layer."""
        try:
            from engine.inspect import check_math

            loaded = getattr(self.engine, "loaded", None)
            if loaded is None:
                raise RuntimeError("no model is loaded")
            r = check_math(loaded, prompt) if prompt.strip() else check_math(loaded)
            self.checked.emit(
                {
                    "rows": [(row.name, float(row.max_abs), float(row.scale)) for row in r.rows],
                    "max_abs": float(r.max_abs),
                    "max_rel": float(r.max_rel),
                    "ok": bool(r.ok),
                    "dtype": r.dtype,
                    "tolerance": float(r.tolerance),
                    "n_tokens": int(r.n_tokens),
                }
            )
        except Exception as e:  # noqa: BLE001
            self.checked.emit({"error": error_text(e)})


class EngineClient(QObject):
    """The GUI thread's handle on the engine thread."""

    _do_load = Signal(str, object)
    _do_unload = Signal()
    _do_adapter = Signal(object)
    _do_generate = Signal(int, object, object)
    _do_count = Signal(int, object)
    _do_inspect = Signal()
    _do_look = Signal(str)
    _do_check = Signal(str)
    _do_job = Signal(object)

    loaded = Signal(object)
    load_failed = Signal(str)
    unloaded = Signal()
    token = Signal(int, str)
    finished = Signal(int, object)
    failed = Signal(int, str)
    counted = Signal(int, int)  # tag (e.g. a conversation id), tokens
    inspected = Signal(object)
    looked = Signal(object)
    checked = Signal(object)
    busy_changed = Signal(bool)

    def __init__(self, factory: Callable[[], Any] = default_engine_factory, parent=None) -> None:
        super().__init__(parent)
        self.thread = QThread()
        self.thread.setObjectName("engine")
        self.worker = EngineWorker(factory)
        self.worker.moveToThread(self.thread)
        self._do_load.connect(self.worker.load)
        self._do_unload.connect(self.worker.unload)
        self._do_adapter.connect(self.worker.set_adapter)
        self._do_generate.connect(self.worker.generate)
        self._do_count.connect(self.worker.count)
        self._do_inspect.connect(self.worker.inspect)
        self._do_look.connect(self.worker.look)
        self._do_check.connect(self.worker.check_math)
        self._do_job.connect(self.worker.run_job)
        for name in (
            "loaded",
            "load_failed",
            "unloaded",
            "token",
            "finished",
            "failed",
            "counted",
            "inspected",
            "looked",
            "checked",
        ):
            getattr(self.worker, name).connect(getattr(self, name))
        self.loaded.connect(self._on_loaded)
        self.load_failed.connect(lambda _m: self._set_loading(False))
        self.unloaded.connect(self._on_unloaded)
        self.finished.connect(lambda *_: self._set_generating(False))
        self.failed.connect(lambda *_: self._set_generating(False))
        self.thread.start()
        self._req = 0
        self.generating = False
        self.loading = False
        self.info: dict | None = None

    # requests (GUI thread) ----------------------------------------------------------------
    def load(self, path: str, adapter: str | None = None) -> None:
        self._set_loading(True)
        self._do_load.emit(str(path), adapter)

    def unload(self) -> None:
        self._do_unload.emit()

    def set_adapter(self, path: str | None) -> None:
        self._set_loading(True)
        self._do_adapter.emit(path)

    def generate(self, messages: list[dict], params: dict) -> int:
        self._req += 1
        self.worker.cancel_flag.clear()
        self._set_generating(True)
        self._do_generate.emit(self._req, list(messages), dict(params))
        return self._req

    def count(self, messages: list[dict], tag: int = 0) -> None:
        """Count tokens on the engine thread; `counted(tag, n)` answers."""
        self._do_count.emit(int(tag), list(messages))

    def inspect(self) -> None:
        self._do_inspect.emit()

    def look(self, prompt: str) -> None:
        self._do_look.emit(prompt)

    def check_math(self, prompt: str = "") -> None:
        """Engine vs float64 reference on the engine thread; `checked(dict)` answers."""
        self._do_check.emit(prompt)

    def submit_job(self, job: Any) -> None:
        """Queue `job.run(engine)` on the engine thread (callable from any thread)."""
        self._do_job.emit(job)

    def cancel(self) -> None:
        """Thread-safe: the worker stops at its next step, the engine within one token."""
        self.worker.cancel_flag.set()
        eng = self.worker.engine
        if eng is not None and self.worker.gui_generating:  # not a server request
            try:
                eng.cancel()
            except Exception:  # noqa: BLE001
                pass

    def shutdown(self, wait_ms: int = 120_000) -> None:
        """Stop generating and end the engine thread (a load in progress is waited for)."""
        self.cancel()
        self.thread.quit()
        self.thread.wait(wait_ms)

    # state ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.generating or self.loading

    def _set_generating(self, on: bool) -> None:
        self.generating = on
        self.busy_changed.emit(self.busy)

    def _set_loading(self, on: bool) -> None:
        self.loading = on
        self.busy_changed.emit(self.busy)

    def _on_loaded(self, info: dict) -> None:
        self.info = info
        self._set_loading(False)

    def _on_unloaded(self) -> None:
        self.info = None
        self._set_loading(False)


class TaskWorker(QObject):
    """Runs `fn(task)` on its own thread. `task.progress(x)` reports; `task.cancelled` asks.

    With `iterate=True` the result is iterated and each item emitted, the cancel flag checked
    between items. With `drain=True` a cancelled generator is still read to its end: for one
    that watches the same flag itself and finishes cleanly (the trainer saves a checkpoint).
    """

    progress = Signal(object)
    item = Signal(object)
    done = Signal(object)
    failed = Signal(str)

    def __init__(
        self, fn: Callable[[TaskWorker], Any], iterate: bool = False, drain: bool = False
    ) -> None:
        super().__init__()
        self._fn = fn
        self._iterate = iterate
        self._drain = drain
        self.cancel_event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    @Slot()
    def run(self) -> None:
        try:
            result = self._fn(self)
            if self._iterate:
                last = None
                for x in result:
                    self.item.emit(x)
                    last = x
                    if self.cancel_event.is_set() and not self._drain:
                        break
                result = last
            self.done.emit(result)
        except Exception as e:  # noqa: BLE001
            self.failed.emit(error_text(e))


_RUNNING: set = set()  # keeps (thread, worker, relay) alive until the thread ends


class _Relay(QObject):
    """Lives on the GUI thread so the callbacks run there (queued), never on the worker."""

    def __init__(self, callbacks: dict) -> None:
        super().__init__()
        self._cb = callbacks

    @Slot(object)
    def done(self, x: object) -> None:
        if self._cb.get("done"):
            self._cb["done"](x)

    @Slot(str)
    def failed(self, m: str) -> None:
        if self._cb.get("failed"):
            self._cb["failed"](m)

    @Slot(object)
    def progress(self, x: object) -> None:
        if self._cb.get("progress"):
            self._cb["progress"](x)

    @Slot()
    def cleanup(self) -> None:
        thread = self.entry[0]
        thread.wait()  # finished is emitted just before the thread really ends
        _RUNNING.discard(self.entry)
        self.deleteLater()

    @Slot(object)
    def item(self, x: object) -> None:
        if self._cb.get("item"):
            self._cb["item"](x)


def run_task(
    fn: Callable[[TaskWorker], Any],
    *,
    on_done: Callable[[Any], None] | None = None,
    on_failed: Callable[[str], None] | None = None,
    on_progress: Callable[[Any], None] | None = None,
    on_item: Callable[[Any], None] | None = None,
    iterate: bool = False,
    drain: bool = False,
) -> TaskWorker:
    """Start `fn` on a new thread; the callbacks run on the calling (GUI) thread."""
    thread = QThread()
    worker = TaskWorker(fn, iterate=iterate, drain=drain)
    worker.moveToThread(thread)
    relay = _Relay({"done": on_done, "failed": on_failed, "progress": on_progress, "item": on_item})
    entry = (thread, worker, relay)
    _RUNNING.add(entry)
    worker.done.connect(relay.done)
    worker.failed.connect(relay.failed)
    worker.progress.connect(relay.progress)
    worker.item.connect(relay.item)
    thread.started.connect(worker.run)
    worker.done.connect(thread.quit)
    worker.failed.connect(thread.quit)
    relay.entry = entry
    thread.finished.connect(relay.cleanup)
    thread.start()
    return worker


def wait_all_tasks(timeout_s: float = 60.0) -> None:
    """Join every running task thread (used at shutdown and by tests)."""
    end = time.monotonic() + timeout_s
    for thread, worker, _relay in list(_RUNNING):
        worker.cancel()
        thread.quit()
        thread.wait(max(0, int((end - time.monotonic()) * 1000)))
