"""Table models for the library: Hub search results, variants, local models (no widgets).

Rows are whatever `engine.hub` returns (dataclasses); columns read attributes by name with
`getattr`, so a field the Hub client lacks shows empty instead of failing.
`discover_local_models()` lists model files when `engine.hub` is not there yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt
from PySide6.QtGui import QColor


def human_bytes(n: float | int | None) -> str:
    if not n:
        return ""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def human_count(n: float | int | None) -> str:
    if not n:
        return ""
    n = float(n)
    for unit in ("", "K", "M", "B"):
        if n < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


FIT_COLORS = {"fits": "#1e7f3a", "tight": "#a35f00", "won't fit": "#b3261e"}


class RecordTableModel(QAbstractTableModel):
    """Rows of records; `columns` is [(header, attribute or callable(record))]."""

    columns: list[tuple[str, Any]] = []

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.rows: list[Any] = []

    def set_rows(self, rows: list[Any]) -> None:
        self.beginResetModel()
        self.rows = list(rows)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802, B008
        return len(self.columns)

    def headerData(self, section: int, orientation, role: int = Qt.DisplayRole):  # noqa: N802
        if role == Qt.DisplayRole and orientation == Qt.Horizontal:
            return self.columns[section][0]
        return None

    def value(self, record: Any, col: int) -> Any:
        getter = self.columns[col][1]
        if callable(getter):
            return getter(record)
        if isinstance(record, dict):
            return record.get(getter)
        return getattr(record, getter, None)

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if not index.isValid():
            return None
        record = self.rows[index.row()]
        if role == Qt.DisplayRole:
            v = self.value(record, index.column())
            return "" if v is None else str(v)
        if role == Qt.UserRole:
            return record
        return None


def _variant_fit(v: Any) -> str:
    return str(getattr(v, "fit", "") or "")


class SearchResultsModel(RecordTableModel):
    columns = [
        ("Model", lambda r: getattr(r, "repo_id", None) or getattr(r, "id", "")),
        ("Downloads", lambda r: human_count(getattr(r, "downloads", 0))),
        ("Likes", lambda r: human_count(getattr(r, "likes", 0))),
        (
            "Params",
            lambda r: human_count(getattr(r, "n_params", None) or getattr(r, "params", None)),
        ),
        ("Formats", lambda r: ", ".join(getattr(r, "formats", None) or [])),
    ]


class VariantsModel(RecordTableModel):
    columns = [
        ("Variant", "name"),
        ("Format", "format"),
        ("Download", lambda v: human_bytes(getattr(v, "bytes", 0))),
        ("Memory needed", lambda v: human_bytes(getattr(v, "estimate_bytes", 0))),
        ("Fit", _variant_fit),
    ]

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if role == Qt.ForegroundRole and self.columns[index.column()][0] == "Fit":
            return QColor(FIT_COLORS.get(_variant_fit(self.rows[index.row()]), "#444444"))
        return super().data(index, role)


class LocalModelsModel(RecordTableModel):
    columns = [
        ("Name", lambda m: getattr(m, "name", None) or Path(str(getattr(m, "path", ""))).name),
        ("Format", lambda m: getattr(m, "format", "")),
        (
            "Size",
            lambda m: human_bytes(getattr(m, "size_bytes", None) or getattr(m, "bytes", None)),
        ),
        ("Path", lambda m: str(getattr(m, "path", ""))),
    ]


class _Local:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.stem if path.is_file() else path.name
        self.format = "gguf" if path.suffix == ".gguf" else "safetensors"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        self.size_bytes = sum(p.stat().st_size for p in files)


def discover_local_models(extra: list[str] | tuple = ()) -> list[Any]:
    """Models on disk: `engine.hub.local_models` when it exists, else a scan of models_dir()."""
    try:
        from engine.hub import local_models

        found = list(local_models(extra_dirs=tuple(extra)))
        if found:
            return found
    except Exception:  # noqa: BLE001 - the hub module may not have landed
        pass
    from engine.paths import models_dir

    out: list[Any] = []
    roots = [models_dir(), *[Path(e) for e in extra]]
    seen = set()
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*.gguf")):
            if p not in seen:
                seen.add(p)
                out.append(_Local(p))
        for cfg in sorted(root.rglob("config.json")):
            d = cfg.parent
            if d not in seen and any(d.glob("*.safetensors")):
                seen.add(d)
                out.append(_Local(d))
    return out


def _job_progress(j: Any) -> float:
    total = getattr(j, "bytes_total", 0) or 0
    return (getattr(j, "bytes_done", 0) or 0) / total if total else 0.0


def _job_speed(j: Any) -> str:
    if getattr(j, "status", "") != "running":
        return ""
    s = human_bytes(getattr(j, "speed_bps", 0))
    eta = getattr(j, "eta_s", None)
    return f"{s}/s" + (f" · {int(eta) // 60}:{int(eta) % 60:02d} left" if eta else "")


class DownloadsModel(RecordTableModel):
    """`engine.hub.DownloadJob` rows; column 2 is drawn as a progress bar (UserRole+1 = 0..1)."""

    columns = [
        ("Model", "repo_id"),
        ("Files", lambda j: ", ".join(j.include) if getattr(j, "include", None) else "all files"),
        (
            "Progress",
            lambda j: f"{human_bytes(j.bytes_done) or '0 B'} / {human_bytes(j.bytes_total) or '?'}",
        ),
        ("Speed", _job_speed),
        ("Status", lambda j: j.status + (f": {j.error}" if getattr(j, "error", None) else "")),
    ]

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole):
        if role == Qt.UserRole + 1 and index.isValid():
            return _job_progress(self.rows[index.row()])
        return super().data(index, role)

    def job_id(self, row: int) -> str | None:
        return self.rows[row].id if 0 <= row < len(self.rows) else None
