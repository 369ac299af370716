"""The download manager against a real HTTP server speaking the Hub's API, with the real
`huggingface_hub` client pointed at it by HF_ENDPOINT: files land byte-identical in the
standard HF cache layout (the client's own `try_to_load_from_cache` finds them), only the
`include`d files are fetched, a dropped connection resumes by Range, 500s are retried, a
wrong size or hash is caught and nothing is marked complete, cancel is quick on a slow
server, pause/resume goes on from the partial file, gated repos give the right advice and the
token never shows in events, errors, logs or the state file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from hubserver import HubServer, hub_env, wait_bytes
from huggingface_hub import try_to_load_from_cache

from engine.hub import DownloadManager

REPO = "org/tiny-GGUF"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    server = HubServer().start()
    server.cache = hub_env(monkeypatch, tmp_path, server)
    rng = __import__("random").Random(0)
    server.q4 = bytes(rng.getrandbits(8) for _ in range(400_000))
    server.q8 = bytes(rng.getrandbits(8) for _ in range(150_000))
    server.add_repo(
        REPO,
        {
            "config.json": b'{"model_type": "llama"}',
            "README.md": b"# tiny\n",
            "tiny-Q4_0.gguf": server.q4,
            "tiny-Q8_0.gguf": server.q8,
        },
        tags=["gguf"],
    )
    yield server
    server.stop()


def _manager(tmp_path, **kw) -> DownloadManager:
    kw.setdefault("backoff_s", 0.05)
    return DownloadManager(tmp_path / "state", **kw)


def test_download_lands_in_hf_cache_byte_identical_only_included(hub, tmp_path):
    m = _manager(tmp_path)
    events = []
    m.subscribe(events.append)
    job = m.wait(m.enqueue(REPO, include=["*Q4_0.gguf", "config.json"]), timeout=30)
    assert job.status == "done", job.error
    found = try_to_load_from_cache(REPO, "tiny-Q4_0.gguf", cache_dir=hub.cache)
    assert isinstance(found, str) and Path(found).read_bytes() == hub.q4
    assert Path(job.path, "config.json").read_bytes() == b'{"model_type": "llama"}'
    assert (hub.cache / "models--org--tiny-GGUF" / "refs" / "main").read_text() == hub.repos[
        REPO
    ].commit
    # Only the requested files were fetched.
    assert not hub.requests_for("tiny-Q8_0.gguf") and not Path(job.path, "tiny-Q8_0.gguf").exists()
    assert job.bytes_total == len(hub.q4) + len(b'{"model_type": "llama"}') == job.bytes_done
    assert events[-1].status == "done" and any(e.kind == "progress" for e in events)
    m.close()


def test_dropped_connection_resumes_by_range(hub, tmp_path):
    hub.drop_after[(REPO, "tiny-Q4_0.gguf")] = [123_457, 2]
    m = _manager(tmp_path)
    job = m.wait(m.enqueue(REPO, include="*Q4_0.gguf"), timeout=30)
    assert job.status == "done", job.error
    assert Path(job.path, "tiny-Q4_0.gguf").read_bytes() == hub.q4
    ranges = [r["range"] for r in hub.requests_for("tiny-Q4_0.gguf")]
    assert ranges == [None, "bytes=123457-", "bytes=246914-"]
    m.close()


def test_500s_then_success_is_retried(hub, tmp_path):
    hub.fail_500[(REPO, "tiny-Q8_0.gguf")] = 3
    m = _manager(tmp_path)
    job = m.wait(m.enqueue(REPO, include="*Q8_0.gguf"), timeout=30)
    assert job.status == "done", job.error
    assert Path(job.path, "tiny-Q8_0.gguf").read_bytes() == hub.q8
    assert hub.fail_500[(REPO, "tiny-Q8_0.gguf")] == 0
    m.close()


def test_500s_forever_give_up_with_message(hub, tmp_path):
    hub.fail_500[(REPO, "tiny-Q8_0.gguf")] = 100
    m = _manager(tmp_path, max_retries=2, backoff_s=0.01)
    job = m.wait(m.enqueue(REPO, include="*Q8_0.gguf"), timeout=30)
    assert job.status == "failed" and "gave up after 2 retries (HTTP 500)" in job.error
    m.close()


@pytest.mark.parametrize("fault", ["longer", "shorter", "corrupt", "content-length"])
def test_wrong_size_or_hash_is_detected_and_not_marked_complete(hub, tmp_path, fault):
    key = (REPO, "tiny-Q8_0.gguf")
    if fault == "corrupt":
        hub.corrupt.add(key)
    elif fault == "content-length":
        hub.lie_length[key] = 5000
    else:
        hub.wrong_size[key] = 1000 if fault == "longer" else -1000
    m = _manager(tmp_path)
    job = m.wait(m.enqueue(REPO, include="*Q8_0.gguf"), timeout=30)
    assert job.status == "failed"
    assert ("sha256 mismatch" if fault == "corrupt" else "size mismatch") in job.error
    assert try_to_load_from_cache(REPO, "tiny-Q8_0.gguf", cache_dir=hub.cache) is None
    assert not [f for f in job.files if f.complete]
    blobs = hub.cache / "models--org--tiny-GGUF" / "blobs"
    assert not blobs.exists() or not [
        p for p in blobs.iterdir() if not p.name.endswith(".incomplete")
    ]
    # Once the server is fixed, resuming the job completes it correctly.
    hub.corrupt.clear()
    hub.wrong_size.clear()
    hub.lie_length.clear()
    m.resume(job.id)
    job = m.wait(job.id, timeout=30)
    assert job.status == "done" and Path(job.path, "tiny-Q8_0.gguf").read_bytes() == hub.q8
    m.close()


def test_slow_server_cancel_within_a_second(hub, tmp_path):
    hub.slow[(REPO, "tiny-Q4_0.gguf")] = 0.02
    m = _manager(tmp_path)
    jid = m.enqueue(REPO, include="*Q4_0.gguf")
    wait_bytes(m, jid, 20_000)
    t0 = time.monotonic()
    m.cancel(jid)
    job = m.wait(jid, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert job.status == "cancelled"
    assert not list((hub.cache / "models--org--tiny-GGUF" / "blobs").glob("*"))  # partial removed
    m.close()


def test_pause_then_resume_continues_from_partial(hub, tmp_path):
    hub.slow[(REPO, "tiny-Q4_0.gguf")] = 0.01
    m = _manager(tmp_path)
    events = []
    m.subscribe(events.append)
    jid = m.enqueue(REPO, include="*Q4_0.gguf")
    wait_bytes(m, jid, 40_000)
    m.pause(jid)
    job = m.wait(jid, timeout=5)
    assert job.status == "paused"
    part = next((hub.cache / "models--org--tiny-GGUF" / "blobs").glob("*.incomplete"))
    have = part.stat().st_size
    assert 40_000 <= have < len(hub.q4)
    # The pause survives a restart of the manager (a new process would read the same state).
    m.close()
    assert (
        json.loads((tmp_path / "state" / "downloads.json").read_text())["jobs"][0]["status"]
        == "paused"
    )
    hub.slow.clear()
    m2 = _manager(tmp_path)
    assert m2.job(jid).status == "paused"
    m2.resume(jid)
    job = m2.wait(jid, timeout=30)
    assert job.status == "done" and Path(job.path, "tiny-Q4_0.gguf").read_bytes() == hub.q4
    assert hub.requests_for("tiny-Q4_0.gguf")[-1]["range"] == f"bytes={have}-"
    speeds = [e.speed_bps for e in events if e.kind == "progress"]
    assert speeds and max(speeds) > 0
    progress = [e for e in events if e.kind == "progress" and e.eta_s is not None]
    assert progress and all(
        e.bytes_total == len(hub.q4) and e.file == "tiny-Q4_0.gguf" for e in progress
    )
    assert all(abs(e.eta_s - (e.bytes_total - e.bytes_done) / e.speed_bps) < 1e-6 for e in progress)
    m2.close()


def test_download_into_chosen_folder(hub, tmp_path):
    m = _manager(tmp_path)
    dest = tmp_path / "my-models" / "tiny"
    dest.mkdir(parents=True)
    (dest / "tiny-Q8_0.gguf").write_bytes(b"\0" * len(hub.q8))  # same size, wrong bytes: replaced
    job = m.wait(m.enqueue(REPO, include="*Q8_0.gguf", local_dir=dest), timeout=30)
    assert job.status == "done" and (dest / "tiny-Q8_0.gguf").read_bytes() == hub.q8
    m.close()


SECRET = "hf_sEcReTtOkEn1234567890abcdefXYZ"


@pytest.mark.parametrize("token", [None, "hf_wrongtoken000000000000000000"])
def test_gated_repo_without_access_says_how_to_get_it(hub, tmp_path, monkeypatch, token):
    hub.add_repo(
        "meta/gated-model",
        {"config.json": b"{}", "w.gguf": b"x" * 20_000},
        gated=True,
        tokens={SECRET},
    )
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    m = _manager(tmp_path)
    job = m.wait(m.enqueue("meta/gated-model"), timeout=30)
    assert job.status == "failed"
    assert "gated" in job.error and "request access on the model page" in job.error
    assert f"{hub.url}/meta/gated-model" in job.error
    if token is None:
        assert "HF_TOKEN" in job.error
    else:
        assert token not in job.error
    m.close()


def test_token_is_used_but_never_leaks(hub, tmp_path, monkeypatch, caplog):
    hub.add_repo(
        "meta/gated-model",
        {"config.json": b"{}", "w.gguf": b"y" * 30_000},
        gated=True,
        tokens={SECRET},
    )
    hub.add_repo(
        "me/private", {"config.json": b"{}", "p.gguf": b"z" * 12_000}, private=True, tokens={SECRET}
    )
    from engine.hub import save_token

    path = save_token(SECRET)  # the saved-token route (no HF_TOKEN in the environment)
    assert os.stat(path).st_mode & 0o777 == 0o600
    caplog.set_level(logging.DEBUG)
    m = _manager(tmp_path)
    events = []
    m.subscribe(events.append)
    hub.fail_500[("meta/gated-model", "w.gguf")] = 1  # exercise the retry/log path too
    ok = m.wait(m.enqueue("meta/gated-model"), timeout=30)
    assert ok.status == "done" and Path(ok.path, "w.gguf").read_bytes() == b"y" * 30_000
    assert all(r["auth"] for r in hub.requests_for("w.gguf"))
    priv = m.wait(m.enqueue("me/private"), timeout=30)
    assert priv.status == "done"
    path.write_text("hf_revokedtoken")  # now a token without access: an error that must not leak it
    bad = m.wait(m.enqueue("me/private", include="p.gguf", local_dir=tmp_path / "x"), timeout=30)
    assert bad.status == "failed" and "not found" in bad.error
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the environment wins over the saved (revoked) token
    env = m.wait(m.enqueue("me/private", include="p.gguf", local_dir=tmp_path / "y"), timeout=30)
    assert env.status == "done" and (tmp_path / "y" / "p.gguf").read_bytes() == b"z" * 12_000
    m.close()
    text = "\n".join(
        [
            caplog.text,
            repr(events),
            repr(m.jobs()),
            (tmp_path / "state" / "downloads.json").read_text(),
        ]
    )
    assert SECRET not in text and "hf_revokedtoken" not in text


def test_remove_running_job_drops_it_and_its_partial(hub, tmp_path):
    hub.slow[(REPO, "tiny-Q4_0.gguf")] = 0.01
    m = _manager(tmp_path)
    jid = m.enqueue(REPO, include="*Q4_0.gguf")
    wait_bytes(m, jid, 10_000)
    m.remove(jid)
    assert m.jobs() == []
    assert not list((hub.cache / "models--org--tiny-GGUF" / "blobs").glob("*"))
    assert json.loads((tmp_path / "state" / "downloads.json").read_text())["jobs"] == []
    m.close()


def test_one_manager_per_state_folder(hub, tmp_path):
    from engine.errors import DownloadError

    m = _manager(tmp_path)
    with pytest.raises(DownloadError, match="another Latent Studio"):
        _manager(tmp_path)
    m.close()
    _manager(tmp_path).close()  # released by close()
