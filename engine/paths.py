"""Where Latent Studio keeps its data on disk.

`LATENT_HOME` overrides the platform's user data folder (tests point it at a temp dir).
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir


def data_dir() -> Path:
    root = os.environ.get("LATENT_HOME") or user_data_dir("latent-studio", appauthor=False)
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sub(name: str) -> Path:
    path = data_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """The app's own models folder (the Hugging Face cache is searched too)."""
    override = os.environ.get("LATENT_MODELS_DIR")
    if override:
        Path(override).mkdir(parents=True, exist_ok=True)
        return Path(override)
    return _sub("models")


def adapters_dir() -> Path:
    return _sub("adapters")


def runs_dir() -> Path:
    return _sub("runs")


def chats_db() -> Path:
    return data_dir() / "chats.sqlite"


def settings_file() -> Path:
    return data_dir() / "settings.toml"
