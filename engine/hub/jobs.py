"""Plain data of the download manager: jobs, per-file state, progress events, and the small
helpers and signals its worker uses. No I/O here beyond `shutil.disk_usage`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "paused", "disk full")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


@dataclass
class FileState:
    path: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1 (regular files)
    done: int = 0
    complete: bool = False


@dataclass
class DownloadJob:
    id: str
    repo_id: str
    revision: str = "main"
    include: list[str] | None = None
    local_dir: str | None = None
    status: str = "queued"  # queued | running | paused | done | failed | cancelled | disk full
    error: str | None = None
    commit: str | None = None
    files: list[FileState] = field(default_factory=list)
    current_file: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    speed_bps: float = 0.0
    eta_s: float | None = None
    path: str | None = None  # the snapshot (or local) folder once done


@dataclass(frozen=True)
class DownloadEvent:
    """One progress or state change; plain data, safe to pass across threads."""

    job_id: str
    repo_id: str
    kind: str  # "progress" | "status"
    status: str
    file: str | None
    file_bytes: int
    file_total: int
    bytes_done: int
    bytes_total: int
    speed_bps: float
    eta_s: float | None
    error: str | None = None


class StopDownload(Exception):
    """The job was paused, cancelled or the manager is closing."""


class DiskFull(Exception):
    pass


class RetryLater(Exception):
    """A transient failure: try again after a backoff."""


def free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
