"""The window's "Serve this model" switch: the OpenAI-compatible API over the loaded model.

`app.server.create_app` is served by uvicorn on a background thread. The server never touches
the engine itself: it is given an `EngineProxy` whose `chat`/`complete` hand a `ServerJob` to the
window's engine thread (`EngineClient.submit_job`) and stream the events back through a plain
queue. MLX streams belong to the thread that made them, and the window's model was loaded on
the engine thread, so every generation (a chat typed in the window or an API request) runs
there, one after another in arrival order.

`ServerController` starts and stops the server and reports its state with Qt signals; it
knows nothing about widgets.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from app.gui.workers import error_text

_END = object()


class ServerJob:
    """One API generation: run on the engine thread, its events read on the server's thread."""

    def __init__(self, kind: str, payload: Any, params: Any) -> None:
        self.kind, self.payload, self.params = kind, payload, params
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.running = threading.Event()
        self.finished = threading.Event()
        self.engine: Any = None

    def run(self, engine: Any) -> None:
        """Called by the engine worker on the engine thread."""
        if self.cancelled.is_set():
            self.finished.set()
            self.events.put(_END)
            return
        self.engine = engine
        self.running.set()
        stream = None
        last: Any = _END
        try:
            if self.kind == "chat":
                stream = engine.chat(self.payload, self.params)
            else:
                stream = engine.complete(self.payload, self.params)
            for ev in stream:
                self.events.put(ev)
                if self.cancelled.is_set():
                    engine.cancel()  # the engine ends within one token and says "cancelled"
        except Exception as e:  # noqa: BLE001 - the server maps it to an HTTP status
            last = e
        finally:
            self.running.clear()
            if stream is not None and hasattr(stream, "close"):
                stream.close()
            self.finished.set()  # before the reader hears the end: counts are exact
            self.events.put(last)

    def cancel(self) -> None:
        self.cancelled.set()
        if self.running.is_set() and self.engine is not None:
            self.engine.cancel()

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item = self.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled.set()  # a reader that stops early frees the engine


class EngineProxy:
    """The engine as `app.server` sees it; every generation runs on the window's engine thread."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._jobs: list[ServerJob] = []
        self.served = 0  # requests that reached the engine and ended

    def _submit(self, kind: str, payload: Any, params: Any) -> Iterator[Any]:
        job = ServerJob(kind, payload, params)
        with self._lock:
            done = [j for j in self._jobs if j.finished.is_set()]
            self.served += len(done)
            self._jobs = [j for j in self._jobs if not j.finished.is_set()] + [job]
        self.client.submit_job(job)
        return iter(job)

    def chat(self, messages: list[dict], params: Any = None) -> Iterator[Any]:
        return self._submit("chat", list(messages), params)

    def complete(self, prompt: str, params: Any = None) -> Iterator[Any]:
        return self._submit("complete", prompt, params)

    def activity(self) -> tuple[int, int]:
        """(requests served so far, requests running or waiting for the engine now)."""
        with self._lock:
            done = sum(j.finished.is_set() for j in self._jobs)
            return self.served + done, len(self._jobs) - done

    def cancel(self) -> None:
        """Stop the server's running request (never a chat typed in the window)."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:  # the server runs one request at a time: this is the current one
            if not job.finished.is_set():
                job.cancel()  # a job still waiting behind a window chat will not start

    def generation_defaults(self) -> Any:
        # reads generation_config.json; no MLX, so any thread may ask
        eng = self.client.worker.engine
        if eng is None:
            from engine.sampling import SamplingParams

            return SamplingParams()
        return eng.generation_defaults()


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class ServerController(QObject):
    """Start/stop uvicorn on a thread; `state_changed(running, url)` and `failed(message)`."""

    state_changed = Signal(bool, str)
    failed = Signal(str)

    def __init__(self, client: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.client = client
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.url = ""
        self.model_name = ""
        self._error = ""
        self._poll = QTimer(self)
        self._poll.setInterval(50)
        self._poll.timeout.connect(self._check)
        self._starting = False
        self.proxy: EngineProxy | None = None

    @property
    def running(self) -> bool:
        return self.server is not None and bool(getattr(self.server, "started", False))

    @property
    def active(self) -> bool:
        """Running, starting or stopping: the thread is alive."""
        return self.thread is not None and self.thread.is_alive()

    def start(
        self, model_name: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None
    ) -> None:
        import uvicorn

        from app.server import create_app

        if self.active:
            return
        self.proxy = EngineProxy(self.client)
        app = create_app(self.proxy, model_name, api_key or None)
        config = uvicorn.Config(
            app,
            host=host,
            port=int(port),
            log_level="warning",
            timeout_graceful_shutdown=2,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.model_name = model_name
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{int(port)}/v1"
        self._error = ""
        self._starting = True

        def run() -> None:
            try:
                self.server.run()
            except BaseException as e:  # noqa: BLE001 - uvicorn calls sys.exit on a busy port
                self._error = error_text(e) if isinstance(e, Exception) else ""
            if not self._error and not getattr(self.server, "started", False):
                self._error = f"could not listen on {host}:{port} (is the port in use?)"

        self.thread = threading.Thread(target=run, name="latent-gui-server", daemon=True)
        self.thread.start()
        self._poll.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self._starting = False
            self._poll.start()

    def wait_stopped(self, timeout_s: float = 10.0) -> None:
        """Block until the server thread has ended (shutdown, tests)."""
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout_s)
        self._check()

    def _check(self) -> None:
        if self._starting and self.running:
            self._starting = False
            self.state_changed.emit(True, self.url)
            self._poll.stop()
            return
        if self.thread is not None and not self.thread.is_alive():
            self._poll.stop()
            error = self._error if self._starting else ""
            self._starting = False
            self.thread = None
            self.server = None
            self.url = ""
            if error:
                self.failed.emit(error)
            self.state_changed.emit(False, "")
