"""Downloads survive what the real world does to them, against the test Hub server:
a process killed with SIGKILL mid-download resumes in a new manager from the partial file
(the server sees `Range: bytes=<partial size>-`, not a fresh GET), and a disk that fills up
(a real, small tmpfs) stops the job cleanly as "disk full" with the partial kept, either
before the first byte (free-space check) or mid-file (ENOSPC), and it completes once space
is freed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hubserver import HubServer, hub_env, wait_bytes

from engine.hub import DownloadManager

REPO = "org/big-GGUF"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    server = HubServer().start()
    server.cache = hub_env(monkeypatch, tmp_path, server)
    server.data = os.urandom(400_000)
    server.add_repo(REPO, {"config.json": b"{}", "big-Q4_0.gguf": server.data})
    yield server
    server.stop()


CHILD = """
import sys, time
from engine.hub import DownloadManager
m = DownloadManager(sys.argv[1], backoff_s=0.05)
m.enqueue(sys.argv[2], include=sys.argv[3])
time.sleep(120)
"""


def test_sigkill_mid_download_then_restart_resumes_from_partial(hub, tmp_path):
    hub.slow[(REPO, "big-Q4_0.gguf")] = 0.01
    state = tmp_path / "state"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), REPO, "*.gguf"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    blobs = hub.cache / "models--org--big-GGUF" / "blobs"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            parts = list(blobs.glob("*.incomplete")) if blobs.exists() else []
            if parts and parts[0].stat().st_size > 60_000:
                break
            assert child.poll() is None, child.stderr.read().decode()
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    have = parts[0].stat().st_size
    assert 60_000 < have < len(hub.data)
    assert len(hub.requests_for("big-Q4_0.gguf")) == 1

    hub.slow.clear()
    m = DownloadManager(state, backoff_s=0.05)  # a new "app start": picks the job up by itself
    (job,) = m.jobs()
    job = m.wait(job.id, timeout=30)
    assert job.status == "done", job.error
    assert Path(job.path, "big-Q4_0.gguf").read_bytes() == hub.data
    gets = hub.requests_for("big-Q4_0.gguf")
    assert [g["range"] for g in gets] == [None, f"bytes={have}-"]
    m.close()


@pytest.fixture()
def small_disk(tmp_path, monkeypatch, hub):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(mnt / "cache"))
    hub.cache = mnt / "cache"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_space_stops_before_the_first_byte(hub, small_disk, tmp_path):
    big = os.urandom(700_000)  # more than the whole 512 KiB disk
    hub.add_repo("org/huge", {"huge.gguf": big})
    m = DownloadManager(tmp_path / "state", backoff_s=0.05)
    job = m.wait(m.enqueue("org/huge"), timeout=30)
    assert job.status == "disk full"
    assert "needs 700.0 KB" in job.error and "free" in job.error
    assert not hub.requests_for("huge.gguf")
    m.close()


def test_disk_filling_mid_file_stops_cleanly_and_resumes(hub, small_disk, tmp_path):
    hub.slow[(REPO, "big-Q4_0.gguf")] = 0.005
    m = DownloadManager(tmp_path / "state", backoff_s=0.05)
    jid = m.enqueue(REPO, include="*.gguf")
    wait_bytes(m, jid, 50_000)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # another program eats the free space
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    job = m.wait(jid, timeout=30)
    assert job.status == "disk full", job.error
    assert "partial file kept" in job.error
    part = next((hub.cache / "models--org--big-GGUF" / "blobs").glob("*.incomplete"))
    have = part.stat().st_size
    assert 50_000 <= have < len(hub.data)
    assert hub.data.startswith(part.read_bytes())  # what was kept is a correct prefix

    filler.unlink()
    hub.slow.clear()
    m.resume(jid)
    job = m.wait(jid, timeout=30)
    assert job.status == "done", job.error
    assert Path(job.path, "big-Q4_0.gguf").read_bytes() == hub.data
    assert hub.requests_for("big-Q4_0.gguf")[-1]["range"] == f"bytes={have}-"
    m.close()
