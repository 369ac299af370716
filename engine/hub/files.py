"""Where a download's files live on disk and how they are checked; the queue's lock.

Cache layout is the one `hf_hub_download` uses: `models--org--name/blobs/<sha256 or git sha1>`
(partial: `<blob>.incomplete`), `snapshots/<commit>/<path>` as a relative symlink to the blob,
`refs/<revision>` holding the commit. A chosen folder gets `<folder>/<path>` (partial:
`<path>.incomplete`). Checksums are the Hub's: sha256 for LFS files, the git blob sha1
(`sha1("blob <size>\\0" + bytes)`) otherwise. Nothing here talks to the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name

from engine.errors import DownloadError
from engine.hub.jobs import DownloadJob, FileState


def lock_queue(state_dir: Path) -> int | None:
    """One manager per state folder (two would fetch into the same partial files)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return None
    fd = os.open(state_dir / "downloads.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DownloadError(
            f"{state_dir}: another Latent Studio window or command is running these downloads; "
            "close it or wait for it to finish"
        ) from None
    return fd


def storage_dir(cache_dir: Path, job: DownloadJob) -> Path:
    return cache_dir / repo_folder_name(repo_id=job.repo_id, repo_type="model")


def final_path(cache_dir: Path, job: DownloadJob, f: FileState) -> Path:
    if job.local_dir:
        return Path(job.local_dir) / f.path
    blob = f.sha256 or f.blob_id or hashlib.sha1(f.path.encode()).hexdigest()
    return storage_dir(cache_dir, job) / "blobs" / blob


def partial_path(cache_dir: Path, job: DownloadJob, f: FileState) -> Path:
    p = final_path(cache_dir, job, f)
    return p.with_name(p.name + ".incomplete")


def pointer_path(cache_dir: Path, job: DownloadJob, f: FileState) -> Path:
    """Where the file appears to readers (the snapshot link, or the file itself in a folder)."""
    if job.local_dir:
        return Path(job.local_dir) / f.path
    return storage_dir(cache_dir, job) / "snapshots" / str(job.commit) / f.path


def file_digest(f: FileState, path: Path) -> tuple[str, str, str] | None:
    """(kind, expected, actual) for the Hub's checksum of this file, or None if it has none."""
    if f.sha256:
        h, expect, kind = hashlib.sha256(), f.sha256, "sha256"
    elif f.blob_id:
        h, expect, kind = hashlib.sha1(b"blob %d\0" % f.size), f.blob_id, "git sha1"
    else:
        return None
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return kind, expect, h.hexdigest()


def file_matches(f: FileState, path: Path) -> bool:
    d = file_digest(f, path)
    return d is None or d[1] == d[2]
