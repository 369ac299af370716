"""The server's engine thread: one queue of requests, batched when the engine allows it.

`EngineQueue` owns a daemon thread that takes `_Job`s (a chat or a text completion, its
`SamplingParams`, and the asyncio queue its events go to) in arrival order. With a plain
`engine.session.Engine` whose model `engine.batch` can batch, the thread decodes every request
in flight together through a `BatchGenerator` (requests join between steps, leave when done);
with anything else (the desktop app's `EngineProxy`, a pipeline, another family, a draft model,
`max_batch` 1) it runs them one at a time through `engine.chat`/`engine.complete`.

This module knows threads and the engine's public API; it knows nothing of HTTP (app/server.py).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from engine.sampling import SamplingParams


@dataclass
class _Job:
    kind: str  # "chat" | "complete"
    payload: Any
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)


_DONE = object()


BATCH_ENV = "LATENT_SERVE_BATCH"


def max_batch_from_env() -> int:
    """`LATENT_SERVE_BATCH`: most requests decoded together (1: one at a time); default 8."""
    from engine.batch import DEFAULT_MAX_BATCH

    value = os.environ.get(BATCH_ENV, "").strip()
    try:
        return max(1, int(value)) if value else DEFAULT_MAX_BATCH
    except ValueError:
        return DEFAULT_MAX_BATCH


class EngineQueue:
    """Runs generations on one dedicated thread: batched when it can be, else one at a time.

    Batched (an `engine.session.Engine` whose model `engine.batch` can decode in a batch, no
    draft model, `max_batch` > 1): requests join the running batch between decode steps, in
    arrival order, and each leaves when it finishes. Otherwise (the desktop app's `EngineProxy`,
    a pipeline or another family): one request at a time in arrival order, through
    `engine.chat`/`engine.complete`. Either way each reply equals the request served alone.
    """

    def __init__(self, engine, max_batch: int | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch_from_env() if max_batch is None else max(1, int(max_batch))
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._current: _Job | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._batch = None  # engine.batch.BatchGenerator for the engine's loaded model
        self.peak_batch = 0  # the most requests decoded in one forward pass so far
        self._ensure_worker()

    def batching_off_reason(self) -> str | None:
        """Why requests are served one at a time (None: they are batched)."""
        from engine.batch import batch_unsupported
        from engine.session import Engine

        if self.max_batch <= 1:
            return f"{BATCH_ENV}={self.max_batch}"
        if not isinstance(self.engine, Engine):
            return "the engine is not an engine.session.Engine (the app's window shares it)"
        loaded = self.engine.loaded
        if loaded is None:
            return "no model is loaded"
        if getattr(self.engine, "draft", None) is not None:
            return "speculative decoding is on (a draft model decodes one request at a time)"
        return batch_unsupported(loaded.model)

    def describe(self) -> str:
        """One line for the server log: batched (how many rows) or one at a time (why)."""
        reason = self.batching_off_reason()
        if reason is not None:
            return f"requests are served one at a time ({reason})"
        batch = self._batcher()
        return f"concurrent requests are batched: up to {batch.max_rows} per forward pass"

    @property
    def batch_in_flight(self) -> int:
        """Requests the batch holds now (decoding, prefilling or waiting for a row)."""
        batch = self._batch
        return 0 if batch is None else batch.active + batch.waiting

    def _batcher(self):
        """The BatchGenerator for the engine's current model (rebuilt when it changes)."""
        from engine.batch import BatchGenerator

        loaded = self.engine.loaded
        with self._lock:
            if self._batch is None or self._batch.loaded is not loaded:
                self._batch = BatchGenerator(
                    loaded,
                    max_batch=self.max_batch,
                    prefill_chunk=getattr(self.engine, "prefill_chunk", 512),
                    prefix_cache=getattr(self.engine, "prefix_cache", None),
                )
            return self._batch

    def _ensure_worker(self) -> None:
        # The worker is a daemon thread that lives as long as the process; it is deliberately not
        # tied to the ASGI lifespan, which may shut an app down and start it again in one process
        # (test clients do): a request after that must find a worker, not wait forever.
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="latent-server-engine", daemon=True
                )
                self._thread.start()

    def submit(self, job: _Job) -> None:
        self._ensure_worker()
        self._jobs.put(job)

    def cancel(self, job: _Job) -> None:
        job.cancelled.set()  # a batched request sees its flag at the next step
        with self._lock:
            if self._current is job:
                self.engine.cancel()

    def _emit(self, job: _Job, item: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            job.cancelled.set()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job.cancelled.is_set():
                continue
            try:
                batched = self.batching_off_reason() is None
            except Exception:  # noqa: BLE001 - an engine that cannot say is served one by one
                batched = False
            if batched:
                self._work_batched(job)
            else:
                self._run_alone(job)

    def _run_alone(self, job: _Job) -> None:
        with self._lock:
            self._current = job
        try:
            if job.kind == "chat":
                stream = self.engine.chat(job.payload, job.params)
            else:
                stream = self.engine.complete(job.payload, job.params)
            for event in stream:
                if job.cancelled.is_set():
                    self.engine.cancel()
                self._emit(job, event)
            self._emit(job, _DONE)
        except Exception as e:  # delivered to the request, which maps it to a status
            self._emit(job, e)
        finally:
            with self._lock:
                self._current = None

    def _prompt_ids(self, job: _Job) -> tuple[list[int], bool]:
        # What Engine.chat / Engine.complete feed the model.
        if job.kind == "chat":
            return self.engine.render(job.payload)
        tokenizer = self.engine.loaded.tokenizer
        return list(tokenizer.encode(job.payload, add_special_tokens=True)), False

    def _work_batched(self, first: _Job) -> None:
        """Serve `first` and every request arriving meanwhile, batched, until none is left."""
        try:
            batch = self._batcher()
        except Exception as e:  # noqa: BLE001
            self._emit(first, e)
            return
        jobs: dict[int, _Job] = {}
        incoming: list[_Job] = [first]
        while True:
            while True:  # everything that arrived since the last step joins now, in order
                try:
                    incoming.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for job in incoming:
                if job.cancelled.is_set():
                    continue
                try:
                    ids, fallback = self._prompt_ids(job)
                    uid = batch.submit(ids, job.params, job.cancelled, template_fallback=fallback)
                except Exception as e:  # noqa: BLE001 - e.g. a prompt longer than the context
                    self._emit(job, e)
                    continue
                jobs[uid] = job
            incoming = []
            if batch.idle:
                return
            try:
                events = batch.step()
            except Exception as e:  # noqa: BLE001 - every request in the batch hears of it
                for job in jobs.values():
                    self._emit(job, e)
                batch.clear()
                return
            self.peak_batch = max(self.peak_batch, batch.peak_rows)
            for uid, event in events:
                job = jobs[uid]
                self._emit(job, event)
                if event.done:
                    self._emit(job, _DONE)
                    del jobs[uid]
