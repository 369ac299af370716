"""Sampling settings: temperature, top-p, top-k, min-p, repetition penalty, max tokens, seed.

`values()` gives a plain dict (the keys of `SamplingParams`); `set_values()` fills it, e.g.
from the model's `generation_defaults()`. Seed -1 means random.
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

GUI_DEFAULTS = {
    "temperature": 0.7,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_tokens": 512,
    "seed": -1,
}
_DEFAULTS_FILE = Path(__file__).resolve().parents[3] / "resources" / "default_settings.json"
if _DEFAULTS_FILE.exists():  # used when a model has no generation_config.json
    GUI_DEFAULTS.update(json.loads(_DEFAULTS_FILE.read_text()).get("sampling", {}))


class SamplingPanel(QWidget):
    changed = Signal(dict)
    reset_requested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.fields: dict = {}

        def dspin(lo, hi, step, dec=2):
            w = QDoubleSpinBox()
            w.setRange(lo, hi)
            w.setSingleStep(step)
            w.setDecimals(dec)
            return w

        def ispin(lo, hi):
            w = QSpinBox()
            w.setRange(lo, hi)
            return w

        self.fields["temperature"] = dspin(0.0, 2.0, 0.05)
        self.fields["top_p"] = dspin(0.0, 1.0, 0.05)
        self.fields["top_k"] = ispin(0, 1000)
        self.fields["min_p"] = dspin(0.0, 1.0, 0.01)
        self.fields["repetition_penalty"] = dspin(0.5, 2.0, 0.05)
        self.fields["max_tokens"] = ispin(1, 131072)
        self.fields["seed"] = ispin(-1, 2**31 - 1)
        self.fields["top_k"].setSpecialValueText("off")
        self.fields["seed"].setSpecialValueText("random")
        form = QFormLayout()
        labels = {
            "temperature": "Temperature",
            "top_p": "Top-p",
            "top_k": "Top-k",
            "min_p": "Min-p",
            "repetition_penalty": "Repetition penalty",
            "max_tokens": "Max tokens",
            "seed": "Seed",
        }
        for key, w in self.fields.items():
            form.addRow(labels[key], w)
            w.valueChanged.connect(lambda *_: self.changed.emit(self.values()))
        reset = QPushButton("Model defaults")
        reset.setToolTip("Reset to the model's generation_config.json")
        reset.clicked.connect(self.reset_requested)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(form)
        lay.addWidget(reset)
        self.set_values(GUI_DEFAULTS)

    def values(self) -> dict:
        return {k: w.value() for k, w in self.fields.items()}

    def set_values(self, values: dict) -> None:
        for key, w in self.fields.items():
            v = values.get(key)
            if key == "seed" and v is None and key in values:
                v = -1
            if v is None:
                continue
            w.blockSignals(True)
            w.setValue(type(w.value())(v))
            w.blockSignals(False)
