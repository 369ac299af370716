"""The fine-tune view drives the real trainer (`engine.train.trainer`) on a tiny llama with its
own tokenizer: the data preview shows the dataset report; a run goes to the end and plots one
training-loss point per step and the validation points, with the best checkpoint marked; the
adapter lands in the adapters list, "Chat with this adapter" applies it and "Fuse" writes a
standalone model the library lists; a cancelled run
resumes from its checkpoint and finishes."""

from __future__ import annotations

import pytest

pytest.importorskip("engine.train.trainer")
from fake_engine import make_window  # noqa: E402
from test_train_trainer import corpus, make_tiny_model  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-ft")
    texts = corpus()
    data = root / "data"
    data.mkdir()
    for i, t in enumerate(texts):
        (data / f"doc{i}.txt").write_text(t)
    return make_tiny_model(root / "model", texts), data


def _setup(qtbot, tmp_path, tiny):
    model, data = tiny
    win = make_window(qtbot, tmp_path / "c.sqlite", load=False)
    with qtbot.waitSignal(win.client.loaded, timeout=5000):
        win.load_model(str(model))  # the chat engine is the fake; training uses the real files
    ft = win.views["finetune"]
    ft.folder.setText(str(data))
    for key, v in {
        "epochs": 1.0,
        "lr": 1e-2,
        "rank": 8,
        "batch_size": 4,
        "max_seq_len": 64,
        "val_fraction": 0.25,
        "eval_every": 2,
    }.items():
        ft.hyper[key].setValue(v)
    return win, ft


def test_finetune_run_plots_and_applies_adapter(qtbot, tmp_path, latent_home, tiny):
    win, ft = _setup(qtbot, tmp_path, tiny)
    ft.preview()
    qtbot.waitUntil(lambda: "documents: 12" in ft.report.toPlainText(), timeout=30000)
    ft.start_btn.click()
    qtbot.waitUntil(lambda: ft.task is None, timeout=120000)
    assert ft.finished_kind == "done", ft.progress.text()
    steps = [e for e in ft.events if e["kind"] == "step"]
    evals = [e for e in ft.events if e["kind"] == "eval"]
    total = steps[-1]["total_steps"]
    assert len(steps) == total >= 2
    # the plot holds exactly the run's points; the best star sits on the lowest val loss
    assert ft.plot.points["train"] == [(e["step"], e["loss"]) for e in steps]
    later = [(e["step"], e["val_loss"]) for e in evals if e["step"] > 0]
    assert ft.plot.points["val"] == [(e["step"], e["val_loss"]) for e in evals]
    assert ft.plot.points["best"] == [min(later, key=lambda p: p[1])]
    assert list(ft.plot.train.getData()[0]) == [e["step"] for e in steps]
    names = [ft.adapters.item(i).text() for i in range(ft.adapters.count())]
    assert ft.run_name in names
    assert "done" in ft.progress.text() and ft.chat_btn.isEnabled()
    with qtbot.waitSignal(win.client.loaded, timeout=5000) as sig:
        ft.chat_btn.click()
    assert sig.args[0]["adapter"] == ft.best_checkpoint
    assert ft.best_checkpoint.endswith(ft.run_name)
    # fuse: base + adapter written as a standalone model that the library then lists
    ft.adapters.setCurrentRow(names.index(ft.run_name))
    ft.fuse_adapter()
    qtbot.waitUntil(lambda: ft.fused_path is not None, timeout=60000)
    from pathlib import Path

    assert (Path(ft.fused_path) / "model.safetensors").is_file()
    assert ft.fused_path in [win.model_combo.itemData(i) for i in range(win.model_combo.count())]
    win.shutdown()


def test_finetune_cancel_then_resume(qtbot, tmp_path, latent_home, tiny):
    win, ft = _setup(qtbot, tmp_path, tiny)
    ft.hyper["epochs"].setValue(3.0)
    ft.start_btn.click()
    qtbot.waitUntil(lambda: any(e["kind"] == "step" for e in ft.events), timeout=60000)
    ft.cancel_btn.click()
    qtbot.waitUntil(lambda: ft.task is None, timeout=60000)
    assert ft.finished_kind == "cancelled" and ft.resume_btn.isEnabled()
    done_steps = max(e["step"] for e in ft.events if e["kind"] == "step")
    ft.resume_btn.click()
    qtbot.waitUntil(lambda: ft.task is None, timeout=120000)
    assert ft.finished_kind == "done", ft.progress.text()
    resumed = [e for e in ft.events if e["kind"] == "step"]
    assert (
        resumed[0]["step"] == done_steps + 1 and resumed[-1]["step"] == resumed[-1]["total_steps"]
    )
    win.shutdown()
