"""The Fine-tune view's adapters list: it lists the adapter folders in the adapters folder;
Delete asks first and removes the folder only when confirmed (No keeps it); Use in chat applies
the selected adapter to the loaded model."""

from __future__ import annotations

import pytest
from fake_engine import make_window
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

pytestmark = pytest.mark.gui


def test_adapters_list_delete_asks_and_use_applies(qtbot, tmp_path, latent_home, monkeypatch):
    from engine.paths import adapters_dir

    for name in ("notes-lora", "mail-lora"):
        d = adapters_dir() / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text("{}")
    win = make_window(qtbot, tmp_path / "c.sqlite")
    ft = win.views["finetune"]
    ft.refresh_adapters()
    names = [ft.adapters.item(i).text() for i in range(ft.adapters.count())]
    assert sorted(names) == ["mail-lora", "notes-lora"]
    row = names.index("notes-lora")
    ft.adapters.setCurrentRow(row)
    asked = []

    def answer(reply):
        def question(*args, **kwargs):
            asked.append(args[2])
            return reply

        return question

    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.No))
    ft._delete_adapter()
    assert (adapters_dir() / "notes-lora").is_dir() and "notes-lora" in asked[-1]
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Yes))
    ft._delete_adapter()
    assert not (adapters_dir() / "notes-lora").exists()
    assert [ft.adapters.item(i).text() for i in range(ft.adapters.count())] == ["mail-lora"]
    ft.adapters.setCurrentRow(0)
    with qtbot.waitSignal(win.client.loaded, timeout=5000) as sig:
        ft._use_adapter()
    assert sig.args[0]["adapter"] == ft.adapters.item(0).data(Qt.UserRole)
    assert win.engine.info().adapter.endswith("mail-lora")
    win.shutdown()
