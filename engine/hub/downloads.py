"""The download manager: a queue of Hub downloads worked by one background thread.

A job is a repo (+ revision + `include` patterns); its files come from the Hub's own metadata
(`model_info(files_metadata=True)`: size, LFS sha256, git blob id). Each file is fetched with a
ranged GET on the `huggingface_hub` client's HTTP session into `<blob>.incomplete`, so a drop,
a 5xx, a pause, a crash or a full disk never loses the bytes already there: the next attempt
asks for `Range: bytes=<have>-`. Network errors and 5xx are retried with exponential backoff.
A finished file is verified (size, then sha256 for LFS files or the git blob sha1 otherwise)
before it is moved into place; a mismatch fails the job and nothing is marked complete.

Files land in the standard Hugging Face cache (`models--org--name/blobs|snapshots|refs`, the
same names `hf_hub_download` uses, so mlx-lm and transformers see them) or in a chosen folder.
Job state lives in `<state_dir>/downloads.json`; jobs that were running when the process died
are resumed when a manager opens that folder again. One manager at a time holds a folder
(an advisory lock on `downloads.lock`, released by `close()` or the process's end). Subscribers get plain `DownloadEvent`s.
This module knows nothing about model formats or Qt.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import httpx2
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_session, hf_raise_for_status

from engine.errors import DownloadError
from engine.hub.common import (
    api,
    auth_headers,
    endpoint,
    friendly_error,
    get_token,
    hf_cache_dir,
    scrub,
)
from engine.hub.files import (
    file_digest,
    file_matches,
    final_path,
    lock_queue,
    partial_path,
    pointer_path,
    storage_dir,
)
from engine.hub.jobs import (
    ACTIVE,
    RETRY_STATUS,
    DiskFull,
    DownloadEvent,
    DownloadJob,
    FileState,
    RetryLater,
    StopDownload,
    fmt_bytes,
    free_bytes,
)

log = logging.getLogger("engine.hub")


class DownloadManager:
    """`enqueue` → job id; `pause/resume/cancel`; `jobs()`; `subscribe(callback)`; `close()`."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        cache_dir: str | Path | None = None,
        max_retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        read_timeout_s: float = 20.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / "downloads.json"
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.read_timeout_s = read_timeout_s
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._jobs: dict[str, DownloadJob] = {}
        self._stop: dict[str, str] = {}  # job id -> "pause" | "cancel"
        self._wake = threading.Event()  # interrupts backoff sleeps
        self._subs: list[Callable[[DownloadEvent], None]] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_emit = 0.0
        self._last_save = 0.0
        self._lock_fd = lock_queue(self.state_dir)
        self._load()
        if any(j.status == "queued" for j in self._jobs.values()):
            self._start_worker()

    # -- public API ------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self._cache_dir or hf_cache_dir()

    def enqueue(
        self,
        repo_id: str,
        include: list[str] | str | None = None,
        revision: str = "main",
        local_dir: str | Path | None = None,
    ) -> str:
        if isinstance(include, str):
            include = [include]
        with self._lock:
            for j in self._jobs.values():
                if (j.repo_id, j.revision, j.include, j.local_dir) == (
                    repo_id,
                    revision,
                    include,
                    str(local_dir) if local_dir else None,
                ) and j.status not in ("done", "cancelled"):
                    if (
                        j.status not in ACTIVE
                    ):  # the same download, paused or stopped: go on with it
                        self.resume(j.id)
                    return j.id
            job = DownloadJob(
                id=uuid.uuid4().hex[:12],
                repo_id=repo_id,
                revision=revision,
                include=list(include) if include else None,
                local_dir=str(local_dir) if local_dir else None,
            )
            self._jobs[job.id] = job
            self._save(force=True)
        self._emit(job, "status")
        self._start_worker()
        return job.id

    def pause(self, job_id: str) -> None:
        self._request_stop(job_id, "pause")

    def cancel(self, job_id: str) -> None:
        self._request_stop(job_id, "cancel")

    def resume(self, job_id: str) -> None:
        """Queue a paused, failed or disk-full job again; it goes on from its partial files."""
        with self._lock:
            job = self._get(job_id)
            if job.status == "running" and self._stop.get(job_id) == "pause":
                del self._stop[job_id]  # paused and resumed before the worker noticed: go on
                return
            if job.status in ("paused", "failed", "disk full", "cancelled"):
                job.status, job.error = "queued", None
                self._stop.pop(job_id, None)
                self._save(force=True)
                self._cond.notify_all()
        self._emit(job, "status")
        self._start_worker()

    def remove(self, job_id: str) -> None:
        """Drop a job from the list (a running one is cancelled first; files already done stay)."""
        with self._lock:
            job = self._get(job_id)
            if job.status == "running":
                self._stop[job_id] = "cancel"
                self._wake.set()
        if job.status == "running":
            self.wait(job_id, timeout=30)
        with self._lock:
            if job.status not in ("done", "cancelled"):
                self._remove_partials(job)
            self._jobs.pop(job_id, None)
            self._save(force=True)

    def jobs(self) -> list[DownloadJob]:
        with self._lock:
            return [self._snapshot(j) for j in self._jobs.values()]

    def job(self, job_id: str) -> DownloadJob:
        with self._lock:
            return self._snapshot(self._get(job_id))

    def subscribe(self, callback: Callable[[DownloadEvent], None]) -> Callable[[], None]:
        with self._lock:
            self._subs.append(callback)
        return lambda: self._subs.remove(callback) if callback in self._subs else None

    def wait(self, job_id: str, timeout: float | None = None) -> DownloadJob:
        """Block until the job stops (done, failed, paused, cancelled, disk full)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._get(job_id).status in ACTIVE:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(0.2 if left is None else min(left, 0.2))
            return self._snapshot(self._get(job_id))

    def close(self) -> None:
        """Stop the worker; a running job goes back to "queued" and resumes next time."""
        with self._lock:
            self._closing = True
            self._cond.notify_all()
        self._wake.set()
        worker = self._thread
        if worker is not None:
            worker.join(timeout=10)
        with self._lock:
            self._save(force=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the queue for the next manager
                self._lock_fd = None

    # -- internals -------------------------------------------------------------------------------
    def _get(self, job_id: str) -> DownloadJob:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise DownloadError(f"no download job {job_id!r}") from None

    @staticmethod
    def _snapshot(job: DownloadJob) -> DownloadJob:
        return replace(
            job,
            files=[replace(f) for f in job.files],
            include=list(job.include) if job.include else None,
        )

    def _request_stop(self, job_id: str, what: str) -> None:
        with self._lock:
            job = self._get(job_id)
            if job.status == "running":
                self._stop[job_id] = what
                self._wake.set()
                return
            if job.status in ("queued", "paused", "failed", "disk full"):
                if what == "cancel":
                    self._remove_partials(job)
                job.status = "cancelled" if what == "cancel" else "paused"
                self._save(force=True)
                self._cond.notify_all()
        self._emit(job, "status")

    def _load(self) -> None:
        if not self.state_file.is_file():
            return
        try:
            raw = json.loads(self.state_file.read_text())
        except ValueError:
            log.warning("download state %s is unreadable; starting empty", self.state_file)
            return
        for d in raw.get("jobs", []):
            files = [FileState(**f) for f in d.pop("files", [])]
            job = DownloadJob(**d, files=files)
            if job.status == "running":  # the process died or closed mid-download
                job.status = "queued"
            job.speed_bps, job.eta_s = 0.0, None
            self._jobs[job.id] = job

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < 1.0:
            return
        self._last_save = now
        data = {"version": 1, "jobs": [asdict(j) for j in self._jobs.values()]}
        tmp = self.state_file.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.state_file)
        except (
            OSError
        ) as e:  # e.g. the same disk is full: keep going, the partial files are the truth
            log.warning("cannot save download state %s: %s", self.state_file, e.strerror or e)

    def _emit(self, job: DownloadJob, kind: str, f: FileState | None = None) -> None:
        now = time.monotonic()
        if kind == "progress":
            if now - self._last_emit < 0.1:
                return
            self._last_emit = now
        cur = f or next((x for x in job.files if x.path == job.current_file), None)
        ev = DownloadEvent(
            job.id,
            job.repo_id,
            kind,
            job.status,
            cur.path if cur else None,
            cur.done if cur else 0,
            cur.size if cur else 0,
            job.bytes_done,
            job.bytes_total,
            job.speed_bps,
            job.eta_s,
            job.error,
        )
        for cb in list(self._subs):
            try:
                cb(ev)
            except Exception:  # a subscriber's bug must not kill the download
                log.exception("download subscriber failed")

    def _start_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._work, name="downloads", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                job = next((j for j in self._jobs.values() if j.status == "queued"), None)
                if self._closing or job is None:
                    self._thread = None
                    return
                job.status, job.error = "running", None
                self._stop.pop(job.id, None)
                self._wake.clear()
                self._save(force=True)
            self._emit(job, "status")
            self._run(job)
            with self._cond:
                job.speed_bps, job.eta_s = 0.0, None
                self._save(force=True)
                self._cond.notify_all()
            self._emit(job, "status")

    def _run(self, job: DownloadJob) -> None:
        try:
            if not job.files:
                self._plan(job)
            self._check_disk(job)
            t0 = time.monotonic()
            for f in job.files:
                if not f.complete:
                    self._download_file(job, f, t0)
            self._finish(job)
            job.status, job.current_file = "done", None
        except StopDownload:
            what = "close" if self._closing else self._stop.pop(job.id, "pause")
            if what == "cancel":
                self._remove_partials(job)
            job.status = {"cancel": "cancelled", "pause": "paused", "close": "queued"}[what]
        except DiskFull as e:
            job.status, job.error = "disk full", scrub(str(e))
        except DownloadError as e:
            job.status, job.error = "failed", scrub(str(e))
        except Exception as e:  # a bug or an unexpected client error: say it, never the token
            log.exception("download %s failed", job.repo_id)
            job.status, job.error = "failed", scrub(f"{job.repo_id}: {type(e).__name__}: {e}")
        if job.error:
            log.warning("download %s: %s", job.repo_id, job.error)

    def _check_stop(self, job: DownloadJob) -> None:
        if self._closing or job.id in self._stop:
            raise StopDownload()

    def _retrying(
        self, job: DownloadJob, what: str, fn: Callable, progress: Callable[[], int] | None = None
    ):
        """Call fn(); retry transient failures with exponential backoff (reset on progress)."""
        attempt, last_mark = 0, progress() if progress else 0
        while True:
            self._check_stop(job)
            try:
                return fn()
            except (httpx2.TransportError, RetryLater) as e:
                reason = type(e).__name__
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status not in RETRY_STATUS:
                    raise friendly_error(e, job.repo_id, what) from None
                reason = f"HTTP {status}"
            if progress and progress() > last_mark:
                attempt, last_mark = 0, progress()
            attempt += 1
            if attempt > self.max_retries:
                raise DownloadError(
                    f"{job.repo_id}/{what}: gave up after {self.max_retries} retries ({reason})"
                )
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            log.info(
                "download %s/%s: %s, retry %d in %.1fs", job.repo_id, what, reason, attempt, delay
            )
            self._wake.wait(delay)

    def _plan(self, job: DownloadJob) -> None:
        info = self._retrying(
            job,
            "model info",
            lambda: api().model_info(job.repo_id, revision=job.revision, files_metadata=True),
        )
        files = []
        for s in info.siblings or []:
            if job.include and not any(fnmatch.fnmatch(s.rfilename, p) for p in job.include):
                continue
            files.append(
                FileState(
                    path=s.rfilename,
                    size=int(s.size or 0),
                    sha256=s.lfs.sha256 if s.lfs else None,
                    blob_id=s.blob_id,
                )
            )
        if not files:
            pats = ", ".join(job.include or [])
            raise DownloadError(
                f"{job.repo_id}: no file matches {pats!r}"
                if pats
                else f"{job.repo_id}: repository is empty"
            )
        with self._lock:
            job.commit, job.files = info.sha, files
            job.bytes_total = sum(f.size for f in files)
            self._save(force=True)

    # -- where files go ---------------------------------------------------------------------------
    def _remove_partials(self, job: DownloadJob) -> None:
        for f in job.files:
            if not f.complete:
                partial_path(self.cache_dir, job, f).unlink(missing_ok=True)
                f.done = 0
        job.bytes_done = sum(f.size for f in job.files if f.complete)

    def _check_disk(self, job: DownloadJob) -> None:
        need = 0
        for f in job.files:
            if not f.complete:
                part = partial_path(self.cache_dir, job, f)
                need += f.size - (part.stat().st_size if part.exists() else 0)
        target = Path(job.local_dir) if job.local_dir else storage_dir(self.cache_dir, job)
        free = free_bytes(target)
        if need > free:
            raise DiskFull(
                f"{job.repo_id}: needs {fmt_bytes(need)} but only {fmt_bytes(free)} is free on "
                f"{target}; free some space and resume"
            )

    # -- one file ---------------------------------------------------------------------------------
    def _download_file(self, job: DownloadJob, f: FileState, t0: float) -> None:
        final, part, pointer = (
            final_path(self.cache_dir, job, f),
            partial_path(self.cache_dir, job, f),
            pointer_path(self.cache_dir, job, f),
        )
        if final.is_file() and final.stat().st_size == f.size and file_matches(f, final):
            self._link(job, f, final, pointer)  # already there (same blob in another revision)
            return
        with self._lock:
            job.current_file = f.path
        url = hf_hub_url(
            job.repo_id, f.path, revision=job.commit or job.revision, endpoint=endpoint()
        )
        # The client's own HEAD: checks access (gated → GatedRepoError) before any byte is fetched.
        meta = self._retrying(
            job, f.path, lambda: get_hf_file_metadata(url, token=get_token() or False)
        )
        if not f.size and meta.size:  # a mirror that lists no sizes: take the file's headers
            with self._lock:
                f.size = int(meta.size)
                job.bytes_total = sum(x.size for x in job.files)
        part.parent.mkdir(parents=True, exist_ok=True)
        self._retrying(
            job,
            f.path,
            lambda: self._fetch(job, f, url, part, t0),
            progress=lambda: part.stat().st_size if part.exists() else 0,
        )
        self._verify(job, f, part)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        self._link(job, f, final, pointer)

    def _link(self, job: DownloadJob, f: FileState, final: Path, pointer: Path) -> None:
        if pointer != final:
            pointer.parent.mkdir(parents=True, exist_ok=True)
            if pointer.is_symlink() or pointer.exists():
                pointer.unlink()
            os.symlink(os.path.relpath(final, pointer.parent), pointer)
        with self._lock:
            f.done, f.complete = f.size, True
            job.bytes_done = sum(x.done for x in job.files)
            self._save(force=True)
        self._emit(job, "progress", f)

    def _fetch(self, job: DownloadJob, f: FileState, url: str, part: Path, t0: float) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:
            part.unlink()
            have = 0
        if have == f.size:
            part.touch()
            return
        headers = {**auth_headers(), "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        timeout = httpx2.Timeout(self.read_timeout_s, connect=10.0)
        with get_session().stream("GET", url, headers=headers, timeout=timeout) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if r.status_code == 200 and have:
                have = 0  # the server ignored Range: start over
            length = int(r.headers.get("Content-Length", "-1"))
            total = (
                int(r.headers["Content-Range"].rsplit("/", 1)[-1])
                if r.status_code == 206
                else length
            )
            if length >= 0 and total != f.size:
                raise DownloadError(
                    f"{job.repo_id}/{f.path}: size mismatch: the Hub lists {f.size} bytes "
                    f"but the server sends {total}; file not saved"
                )
            mark_b, mark_t = have, time.monotonic()
            with open(part, "r+b" if have else "wb", buffering=0) as out:
                out.seek(have)
                out.truncate()
                for chunk in r.iter_bytes():
                    self._check_stop(job)
                    view = memoryview(chunk)
                    while view:
                        try:
                            n = out.write(view)
                        except OSError as e:
                            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                                raise DiskFull(
                                    f"{job.repo_id}/{f.path}: disk full after {fmt_bytes(have)}; "
                                    "partial file kept, free some space and resume"
                                ) from None
                            raise
                        view, have = view[n:], have + n
                    if have > f.size:
                        raise DownloadError(
                            f"{job.repo_id}/{f.path}: size mismatch: the server sent more "
                            f"than the {f.size} bytes the Hub lists; file not saved"
                        )
                    now = time.monotonic()
                    with self._lock:
                        f.done = have
                        job.bytes_done = sum(x.done for x in job.files)
                        if now - mark_t >= 0.5:
                            rate = (have - mark_b) / (now - mark_t)
                            job.speed_bps = (
                                rate if not job.speed_bps else 0.5 * job.speed_bps + 0.5 * rate
                            )
                            mark_b, mark_t = have, now
                        elif not job.speed_bps and now > t0:
                            job.speed_bps = job.bytes_done / max(now - t0, 1e-3)
                        left = job.bytes_total - job.bytes_done
                        job.eta_s = left / job.speed_bps if job.speed_bps > 0 else None
                        self._save()
                    self._emit(job, "progress", f)
        if have < f.size:
            raise RetryLater(f"connection closed at {have} of {f.size} bytes")

    def _verify(self, job: DownloadJob, f: FileState, part: Path) -> None:
        size = part.stat().st_size
        if size != f.size:
            part.unlink()
            raise DownloadError(
                f"{job.repo_id}/{f.path}: size mismatch ({size} bytes, the Hub lists "
                f"{f.size}); partial deleted, resume to fetch it again"
            )
        d = file_digest(f, part)
        if d is not None and d[1] != d[2]:
            kind, expect, got = d
            part.unlink()
            with self._lock:
                f.done = 0
            raise DownloadError(
                f"{job.repo_id}/{f.path}: {kind} mismatch (expected {expect[:12]}…, got "
                f"{got[:12]}…); partial deleted, resume to fetch it again"
            )

    def _finish(self, job: DownloadJob) -> None:
        if job.local_dir:
            job.path = job.local_dir
            return
        storage = storage_dir(self.cache_dir, job)
        if job.commit and job.revision != job.commit:
            (storage / "refs").mkdir(parents=True, exist_ok=True)
            (storage / "refs" / job.revision).write_text(job.commit)
        job.path = str(storage / "snapshots" / str(job.commit))
