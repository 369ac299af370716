"""Library and downloads views against the local Hub-compatible test server (the real
`engine.hub` client): search with a format filter lists the repo, its variants show sizes and a
fit label, a variant downloads byte-identical into the HF cache with progress in the table;
pause, a restart of the window, and resume finish the job; a model file is imported in place,
loaded from the local list and forgotten (the file stays); a corrupt download fails with the
reason in the error banner; the inspector lists parameters."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("engine.hub")
from fake_engine import make_window  # noqa: E402
from hubserver import HubServer, hub_env  # noqa: E402

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    """Chats, settings, downloads and adapters go to a temp LATENT_HOME, never the user's."""
    return latent_home


REPO = "org/tiny-GGUF"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    server = HubServer().start()
    server.cache = hub_env(monkeypatch, tmp_path, server)
    rng = random.Random(0)
    server.q4 = bytes(rng.getrandbits(8) for _ in range(300_000))
    server.add_repo(
        REPO,
        {
            "config.json": b'{"model_type": "llama"}',
            "tiny-Q4_0.gguf": server.q4,
            "tiny-Q8_0.gguf": b"x" * 90_000,
        },
        tags=["gguf"],
        downloads=1234,
    )
    server.add_repo("org/other-safetensors", {"config.json": b"{}"}, tags=["safetensors"])
    yield server
    server.stop()


def _jobs(win):
    return win.views["downloads"].model.rows


def test_search_variants_download(qtbot, tmp_path, hub):
    win = make_window(qtbot, tmp_path / "c.sqlite", load=False)
    lib = win.views["library"]
    lib.query.setText("tiny")
    lib.format.setCurrentText("gguf")
    lib.search_btn.click()
    qtbot.waitUntil(lambda: lib.results.rowCount() == 1, timeout=10000)
    assert lib.results.data(lib.results.index(0, 0)) == REPO
    lib.results_view.selectRow(0)
    qtbot.waitUntil(lambda: lib.variants.rowCount() == 2, timeout=10000)
    names = [lib.variants.data(lib.variants.index(r, 0)) for r in range(2)]
    row = names.index("Q4_0")
    assert lib.variants.data(lib.variants.index(row, 2)) == "300 KB"
    assert lib.variants.data(lib.variants.index(row, 4)) in ("fits", "tight", "won't fit")
    lib.variants_view.selectRow(row)
    lib.download_btn.click()
    downloads = win.views["downloads"]
    qtbot.waitUntil(lambda: bool(_jobs(win)) and _jobs(win)[0].status == "done", timeout=20000)
    job = _jobs(win)[0]
    assert job.bytes_done == job.bytes_total == len(hub.q4)
    assert downloads.model.data(downloads.model.index(0, 2)).startswith("300 KB / 300 KB")
    from pathlib import Path

    assert Path(job.path, "tiny-Q4_0.gguf").read_bytes() == hub.q4
    assert not Path(job.path, "tiny-Q8_0.gguf").exists()
    win.shutdown()


def test_pause_survives_restart_then_resume(qtbot, tmp_path, hub):
    hub.slow[(REPO, "tiny-Q4_0.gguf")] = 0.02  # ~1.5 s for the file
    db = tmp_path / "c.sqlite"
    win = make_window(qtbot, db, load=False)
    job_id = win.views["library"].enqueue(REPO, ["tiny-Q4_0.gguf"])
    dl = win.views["downloads"]
    qtbot.waitUntil(lambda: bool(_jobs(win)) and _jobs(win)[0].bytes_done > 0, timeout=10000)
    dl.table.selectRow(0)
    dl.buttons["pause"].click()
    qtbot.waitUntil(lambda: _jobs(win)[0].status == "paused", timeout=10000)
    partial = _jobs(win)[0].bytes_done
    assert 0 < partial < len(hub.q4)
    win.shutdown()
    win.close()
    hub.slow.clear()
    win2 = make_window(qtbot, db, load=False)
    (job,) = _jobs(win2)
    assert (job.id, job.status) == (job_id, "paused")
    win2.views["downloads"].act("resume", job_id)
    qtbot.waitUntil(lambda: _jobs(win2)[0].status == "done", timeout=20000)
    assert _jobs(win2)[0].bytes_done == len(hub.q4)
    win2.shutdown()


def test_inspector_lists_parameters(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite")
    ins = win.views["inspector"]
    qtbot.waitUntil(lambda: ins.model.rowCount() == 3, timeout=5000)
    rows = {
        ins.model.data(ins.model.index(r, 0)): ins.model.data(ins.model.index(r, 1))
        for r in range(3)
    }
    assert rows == {
        "embed_tokens.weight": "32 × 8",
        "layers.0.self_attn.q_proj.weight": "8 × 8",
        "norm.weight": "8",
    }
    win.shutdown()


def test_local_models_import_load_forget(qtbot, tmp_path, default_model_path, hub):
    win = make_window(qtbot, tmp_path / "c.sqlite", load=False)
    lib = win.views["library"]
    qtbot.waitUntil(lambda: lib.local.rowCount() == 0, timeout=5000)  # a fresh library
    lib.import_path(str(default_model_path))
    qtbot.waitUntil(lambda: lib.local.rowCount() == 1, timeout=10000)
    (m,) = lib.local.rows
    assert m.path == str(default_model_path.resolve()) and m.format == "gguf"
    assert win.model_combo.findData(m.path) >= 0
    lib.local_view.selectRow(0)
    with qtbot.waitSignal(win.client.loaded, timeout=5000) as sig:
        lib.load_selected()
    assert sig.args[0]["path"] == m.path
    lib.delete_path(m.path)  # an import is only forgotten: the file stays
    qtbot.waitUntil(lambda: lib.local.rowCount() == 0, timeout=10000)
    assert default_model_path.exists() and lib.status.text() == "Freed 0 B"
    win.shutdown()


def test_failed_download_shows_banner(qtbot, tmp_path, hub):
    hub.corrupt.add((REPO, "tiny-Q8_0.gguf"))  # served bytes do not match the Hub's sha256
    win = make_window(qtbot, tmp_path / "c.sqlite", load=False)
    win.views["library"].enqueue(REPO, ["tiny-Q8_0.gguf"])
    qtbot.waitUntil(lambda: bool(_jobs(win)) and _jobs(win)[0].status == "failed", timeout=20000)
    qtbot.waitUntil(lambda: "sha256 mismatch" in win.banner.text(), timeout=5000)
    assert win.banner.kind == "error" and REPO in win.banner.text()
    win.shutdown()
