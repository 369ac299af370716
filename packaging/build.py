"""Build the double-clickable Latent Studio app with PyInstaller (`make package` runs this).

`python packaging/build.py [--dist DIR] [--force]` freezes packaging/latent_studio.spec into
`DIR/latent-studio/` (Linux: the folder, its `latent-studio` binary, a `.desktop` file, the icon
and `install-desktop-entry.sh`; macOS: also `DIR/Latent Studio.app`) and prints the size.

A build is skipped when a stamp in the output folder matches the fingerprint of everything that
goes in: the spec and this folder, pyproject.toml, our packages' sources, resources/, and the
versions of Python, PyInstaller, MLX and PySide6. This module knows how to build and describe
the package; what goes inside it is the spec's business.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "packaging"
NAME = "latent-studio"
STAMP = ".build-stamp"
SOURCES = ("app", "engine", "kernels", "resources", "packaging")
TOOLS = ("pyinstaller", "pyinstaller-hooks-contrib", "mlx", "mlx-metal", "PySide6-Essentials")


def fingerprint() -> str:
    """A hash of every input of a build (file names and contents, tool versions)."""
    h = hashlib.sha256()
    h.update(f"{sys.version}|{sys.platform}".encode())
    for tool in TOOLS:
        try:
            h.update(f"{tool}={version(tool)}".encode())
        except PackageNotFoundError:
            h.update(f"{tool}=none".encode())
    files = [ROOT / "pyproject.toml"]
    for top in SOURCES:
        files += [
            p
            for p in (ROOT / top).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    for path in sorted(files):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def folder_size(path: Path) -> int:
    """Bytes of the regular files under path (symbolic links are not counted twice)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def app_folder(dist: Path) -> Path:
    return dist / NAME


def binary(dist: Path) -> Path:
    """The app's executable inside a built one-folder package."""
    return app_folder(dist) / NAME


def add_linux_desktop_files(folder: Path) -> None:
    """The .desktop entry, the icon and a script that installs both for the current user."""
    shutil.copy2(PKG / "linux" / f"{NAME}.desktop", folder / f"{NAME}.desktop")
    shutil.copy2(ROOT / "resources" / "icon.png", folder / f"{NAME}.png")
    script = folder / "install-desktop-entry.sh"
    shutil.copy2(PKG / "linux" / "install-desktop-entry.sh", script)
    script.chmod(0o755)


def build_started(folder: Path) -> float:
    """When the build in `folder` began reading its inputs (epoch seconds; 0 if unknown)."""
    for line in (folder / STAMP).read_text().splitlines():
        if line.startswith("started="):
            return float(line.removeprefix("started="))
    return 0.0


def build(dist: Path, force: bool = False, log=print) -> Path:
    """Build (or reuse) the package under `dist`; returns the app folder."""
    dist = dist.resolve()
    stamp = app_folder(dist) / STAMP
    want = fingerprint()
    if (
        not force
        and stamp.is_file()
        and stamp.read_text().split("\n", 1)[0] == want
        and binary(dist).is_file()
    ):
        log(f"package is up to date: {app_folder(dist)}")
        return app_folder(dist)
    work = ROOT / "build" / "pyinstaller"  # ignored by git; PyInstaller reuses its analysis
    cmd = [
        sys.executable,
        "-m",
        "PyInstaller",
        "--noconfirm",
        "--log-level",
        "WARN",
        "--distpath",
        str(dist),
        "--workpath",
        str(work),
        str(PKG / "latent_studio.spec"),
    ]
    log("$ " + " ".join(cmd))
    t0, t_start = time.monotonic(), time.time()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    subprocess.run(cmd, cwd=str(ROOT), check=True, env=env)
    folder = app_folder(dist)
    if sys.platform.startswith("linux"):
        add_linux_desktop_files(folder)
    # the fingerprint, and when the build read its inputs (a source changed after that is in
    # the next build: its fingerprint differs)
    stamp.write_text(f"{want}\nstarted={t_start}\n")
    log(f"built {folder} in {time.monotonic() - t0:.0f} s")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dist", type=Path, default=ROOT / "dist", help="output folder (default dist/)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    folder = build(args.dist, force=args.force)
    print(f"app folder: {folder} ({folder_size(folder) / 1e6:.0f} MB)")
    mac_app = args.dist / "Latent Studio.app"
    if mac_app.exists():
        print(
            f"macOS app: {mac_app} ({folder_size(mac_app) / 1e6:.0f} MB); sign it: packaging/macos/SIGNING.md"
        )
    print(f"run it: {binary(args.dist.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
