"""The local library: models already on this machine, wherever they are.

Sources: the shared Hugging Face cache (read with the client's `scan_cache_dir`, so what
mlx-lm and transformers downloaded shows up too), the app's models folder
(`engine.paths.models_dir()`), user-chosen folders, and single files or folders imported in
place (their paths kept in `<data_dir>/imported.json`; imported files are never copied and
never deleted, only forgotten). Each model gets size, format, family (`model_type` or the
GGUF architecture) and context length, read from config.json or the GGUF header.
This module knows nothing about the network.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from engine.errors import ModelLoadError
from engine.hub.common import hf_cache_dir
from engine.hub.search import file_reader, gguf_header
from engine.paths import data_dir, models_dir

IMPORTED = "imported.json"


@dataclass
class LocalModel:
    name: str
    path: str
    format: str  # "gguf" | "mlx" | "safetensors"
    size_bytes: int
    family: str | None = None
    context_length: int | None = None
    source: str = "folder"  # "hf-cache" | "models-dir" | "folder" | "imported"
    repo_id: str | None = None
    commit: str | None = None


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # follows snapshot links


def describe(path: str | Path) -> tuple[str, str | None, int | None] | None:
    """(format, family, context length) of a model file/folder, or None if it holds no model."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        try:
            meta, _ = gguf_header(file_reader(p))
        except Exception:
            return "gguf", None, None
        arch = meta.get("general.architecture")
        return "gguf", arch, meta.get(f"{arch}.context_length")
    if not p.is_dir():
        return None
    ggufs = sorted(p.glob("*.gguf"))
    if not any(p.glob("*.safetensors")):
        return describe(ggufs[0]) if len(ggufs) == 1 else None
    cfg = {}
    if (p / "config.json").is_file():
        try:
            cfg = json.loads((p / "config.json").read_text())
        except ValueError:
            cfg = {}
    text = cfg.get("text_config", cfg)
    fmt = "mlx" if cfg.get("quantization") else "safetensors"
    return (
        fmt,
        cfg.get("model_type"),
        text.get("max_position_embeddings") or text.get("n_positions"),
    )


def _imported_file() -> Path:
    return data_dir() / IMPORTED


def _imported() -> list[str]:
    f = _imported_file()
    try:
        return list(json.loads(f.read_text())) if f.is_file() else []
    except ValueError:
        return []


def _write_imported(paths: list[str]) -> None:
    f = _imported_file()
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(paths, indent=1))
    tmp.replace(f)


def _scan_folder(root: Path, source: str) -> list[LocalModel]:
    out: list[LocalModel] = []
    if not root.is_dir():
        return out
    candidates = [root] + [p for p in root.rglob("*") if p.is_dir() and ".cache" not in p.parts]
    seen: set[Path] = set()
    for d in candidates:
        if any(d.glob("*.safetensors")):
            if (desc := describe(d)) is not None:
                out.append(
                    LocalModel(d.name, str(d), desc[0], _tree_size(d), desc[1], desc[2], source)
                )
                seen.add(d)
    for g in sorted(root.rglob("*.gguf")):
        if g.parent in seen or g.name.lower().startswith("mmproj"):
            continue
        fmt, fam, ctx = describe(g) or ("gguf", None, None)
        out.append(LocalModel(g.name, str(g), fmt, g.stat().st_size, fam, ctx, source))
    return out


def _hf_cache_models() -> list[LocalModel]:
    try:
        info = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, FileNotFoundError):
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            snap = Path(rev.snapshot_path)
            desc = describe(snap)
            if desc is None:  # several GGUF quants: one entry per file
                for g in sorted(snap.glob("*.gguf")):
                    if not g.name.lower().startswith("mmproj"):
                        fmt, fam, ctx = describe(g) or ("gguf", None, None)
                        out.append(
                            LocalModel(
                                f"{repo.repo_id}/{g.name}",
                                str(g),
                                fmt,
                                g.stat().st_size,
                                fam,
                                ctx,
                                "hf-cache",
                                repo.repo_id,
                                rev.commit_hash,
                            )
                        )
                continue
            out.append(
                LocalModel(
                    repo.repo_id,
                    str(snap),
                    desc[0],
                    rev.size_on_disk,
                    desc[1],
                    desc[2],
                    "hf-cache",
                    repo.repo_id,
                    rev.commit_hash,
                )
            )
    return out


def local_models(extra_dirs: tuple[str | Path, ...] | list[str | Path] = ()) -> list[LocalModel]:
    """Every model found in the HF cache, the models folder, `extra_dirs` and the imports."""
    out = _hf_cache_models() + _scan_folder(models_dir(), "models-dir")
    for d in extra_dirs:
        out += _scan_folder(Path(d), "folder")
    for p in _imported():
        path = Path(p)
        if (desc := describe(path)) is not None:
            out.append(
                LocalModel(
                    path.name, str(path), desc[0], _tree_size(path), desc[1], desc[2], "imported"
                )
            )
    seen, unique = set(), []
    for m in out:
        key = str(Path(m.path).resolve()) if m.source != "hf-cache" else m.path
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique


def import_model(path: str | Path) -> LocalModel:
    """Reference a GGUF file or a model folder in place; it then shows in `local_models()`."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or folder")
    desc = describe(p)
    if desc is None:
        raise ModelLoadError(
            f"{p}: not a model (expected a .gguf file, or a folder with "
            "config.json and .safetensors weights)"
        )
    paths = _imported()
    if str(p) not in paths:
        _write_imported(paths + [str(p)])
    return LocalModel(p.name, str(p), desc[0], _tree_size(p), desc[1], desc[2], "imported")


def delete_model(path_or_repo: str | Path) -> int:
    """Delete a model from disk and return the bytes freed (0 for an import: only forgotten)."""
    key = str(path_or_repo)
    try:
        cache = scan_cache_dir(hf_cache_dir())
    except (CacheNotFound, FileNotFoundError):
        cache = None
    if cache is not None:
        for repo in cache.repos:
            revs = [
                r
                for r in repo.revisions
                if key == repo.repo_id or Path(key).resolve() == Path(r.snapshot_path).resolve()
            ]
            if revs:
                strategy = cache.delete_revisions(*[r.commit_hash for r in revs])
                freed = strategy.expected_freed_size
                strategy.execute()
                return freed
    target = Path(key).expanduser()
    if str(target.resolve()) in _imported():
        _write_imported([p for p in _imported() if p != str(target.resolve())])
        return 0
    if not (target.exists() and describe(target) is not None):
        named = [m for m in local_models() if m.source == "models-dir" and m.name == key]
        if not named:
            raise ModelLoadError(f"{key}: no such model in the library (see `latent models`)")
        target = Path(named[0].path)
    size = _tree_size(target)
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return size
