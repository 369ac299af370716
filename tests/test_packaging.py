"""The packaged app (packaging/) is complete and runs on its own.

The slow tests build the PyInstaller one-folder package (packaging/build.py; reused when no input
changed) and prove that the frozen binary, run from a folder outside the repo with no `.venv` on
PATH and no PYTHONPATH, prints the version written in pyproject.toml and passes `--smoke-test`
(real engine, default model, offscreen window, a reply that names Paris) and answers an OpenAI
chat request from `latent-studio serve`; that the archive holds
every module of our source tree (dynamic imports included), `latent_kernels` and not the
dev-only stack; that every bundled library's dependencies resolve inside the bundle (save the
display-server libraries every desktop has); and that the Linux desktop entry installs.
The fast tests check the macOS icon set against Apple's ICNS layout and the Info.plist against
the spec.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "packaging"
sys.path.insert(0, str(PKG))
import build as pkg_build  # noqa: E402  (packaging/build.py)

sys.path.remove(str(PKG))

BUILD_TIMEOUT_S = 900
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def package() -> Path:
    """The built app folder (dist/latent-studio), built now unless up to date."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the package test builds the Linux folder")
    pytest.importorskip("PyInstaller")
    return pkg_build.build(ROOT / "dist", log=lambda *a: None)


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment as a desktop session gives it: no venv, no PYTHONPATH, no LD_PRELOAD."""
    keep = ("HOME", "LANG", "USER", "DISPLAY", "XDG_RUNTIME_DIR", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env["LATENT_HOME"] = str(tmp_path / "home")
    env.update(extra)
    assert ".venv" not in env["PATH"] and "PYTHONPATH" not in env
    return env


@pytest.mark.slow
def test_frozen_version(package: Path, tmp_path: Path):
    out = subprocess.run(
        [str(package / "latent-studio"), "--version"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"latent-studio {project_version()}"


@pytest.mark.slow
def test_frozen_smoke_test_answers(package: Path, tmp_path: Path, default_model_path: Path):
    # The default model is found where the app keeps models (not bundled, not fetched here).
    models = default_model_path.parent.parent
    env = clean_env(tmp_path, QT_QPA_PLATFORM="offscreen", LATENT_MODELS_DIR=str(models))
    out = subprocess.run(
        [str(package / "latent-studio"), "--smoke-test"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    reply = next((ln for ln in out.stdout.splitlines() if ln.startswith("reply:")), "")
    assert "Paris" in reply, out.stdout + out.stderr


@pytest.mark.slow
def test_frozen_server_answers(package: Path, tmp_path: Path, default_model_path: Path):
    """`latent-studio serve` (FastAPI + uvicorn, imported by name at run time) works frozen."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(tmp_path, LATENT_MODELS_DIR=str(default_model_path.parent.parent))
    proc = subprocess.Popen(
        [str(package / "latent-studio"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                    models = json.load(r)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        assert models["data"], models
        body = {
            "model": models["data"][0]["id"],
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        }
        req = urllib.request.Request(
            f"{base}/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.load(r)
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def source_modules(before: float) -> set[str]:
    """Every module of our tree older than `before` (epoch s), named as imported."""
    found = set()
    for top, name in (("app", "app"), ("engine", "engine"), ("kernels", "latent_kernels")):
        for py in (ROOT / top).rglob("*.py"):
            if py.stat().st_mtime >= before:
                continue  # written while the package was building: the next build has it
            parts = py.relative_to(ROOT / top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.add(".".join((name, *parts)))
    # not part of the app: the screenshot tool and the kernels' C++/CUDA test harness
    return {
        m for m in found if m != "app.gui.screenshots" and not m.startswith("latent_kernels.shim")
    }


@pytest.mark.slow
def test_archive_holds_our_modules_and_no_dev_stack(package: Path):
    from PyInstaller.archive.readers import CArchiveReader

    pyz = CArchiveReader(str(package / "latent-studio")).open_embedded_archive("PYZ.pyz")
    modules = set(pyz.toc)
    missing = source_modules(pkg_build.build_started(package)) - modules
    assert not missing, f"modules left out of the package: {sorted(missing)}"
    tops = {m.split(".")[0] for m in modules}
    for dev_only in ("torch", "transformers", "mlx_lm", "kernels", "pytest", "gguf"):
        assert dev_only not in tops, f"{dev_only} is in the package"
    assert "mlx.core" not in modules  # an extension module: a file next to the archive
    internal = package / "_internal"
    assert (internal / "mlx" / "lib" / "libmlx.so").is_file()
    assert list((internal / "mlx").glob("core.*.so"))
    for name in ("icon.png", "icon.svg", "default_settings.json"):
        assert (internal / "resources" / name).read_bytes() == (
            ROOT / "resources" / name
        ).read_bytes()
    assert (internal / f"latent_studio-{project_version()}.dist-info" / "METADATA").is_file()


@pytest.mark.slow
def test_qt_plugins_are_bundled(package: Path):
    import PySide6

    plugins = package / "_internal" / "PySide6" / "Qt" / "plugins"
    for plugin in ("libqoffscreen.so", "libqxcb.so", "libqwayland.so", "libqminimal.so"):
        assert (plugins / "platforms" / plugin).is_file(), plugin
    for plugin in ("libqsvg.so", "libqjpeg.so", "libqico.so"):
        assert (plugins / "imageformats" / plugin).is_file(), plugin
    source = Path(PySide6.__file__).parent / "Qt" / "plugins"
    # (PySide6 6.12 on Linux ships no styles/ folder: Fusion is built in)
    for folder in ("platforms", "imageformats", "iconengines", "platformthemes", "styles"):
        if (source / folder).is_dir():
            assert (plugins / folder).is_dir(), folder


# Display-server libraries: present on any desktop with X11/Wayland/GTK (and bundled when the
# build machine has them); a headless build machine may lack them.
DESKTOP_LIBS = re.compile(r"^lib(xcb-|wayland-|gtk-3|gdk-3|xkbcommon|X|EGL|GL|gbm|drm|vulkan)")


@pytest.mark.slow
def test_bundled_libraries_resolve(package: Path):
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    internal = package / "_internal"
    elfs = [package / "latent-studio"]
    elfs += [p for p in internal.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    env = dict(os.environ, LD_LIBRARY_PATH=str(internal))
    env.pop("LD_PRELOAD", None)
    unresolved = {}
    for elf in elfs:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, env=env)
        for line in out.stdout.splitlines():
            if "=> not found" in line:
                lib = line.split("=>")[0].strip()
                if not DESKTOP_LIBS.match(lib):
                    unresolved.setdefault(lib, []).append(str(elf.relative_to(package)))
    assert not unresolved, f"libraries neither bundled nor on every desktop: {unresolved}"


@pytest.mark.slow
def test_desktop_entry_installs(package: Path, tmp_path: Path):
    desktop = (package / "latent-studio.desktop").read_text()
    entry = dict(ln.split("=", 1) for ln in desktop.splitlines() if "=" in ln)
    assert desktop.startswith("[Desktop Entry]")
    assert entry["Type"] == "Application" and entry["Name"] == "Latent Studio"
    assert (package / f"{entry['Icon']}.png").read_bytes()[:8] == PNG_MAGIC
    data = tmp_path / "share"
    env = dict(os.environ, XDG_DATA_HOME=str(data))
    subprocess.run(
        [str(package / "install-desktop-entry.sh")], check=True, env=env, capture_output=True
    )
    installed = (data / "applications" / "latent-studio.desktop").read_text()
    exec_line = next(ln for ln in installed.splitlines() if ln.startswith("Exec="))
    target = Path(exec_line.removeprefix("Exec=").strip('"'))
    assert target == package / "latent-studio" and os.access(target, os.X_OK)
    assert (data / "icons" / "hicolor" / "256x256" / "apps" / "latent-studio.png").is_file()


# --- macOS pieces, checked on any OS ---------------------------------------------------------

# Apple's ICNS chunk types that hold PNG data, and their pixel sizes (icns format definition)
ICNS_PNG_SIZES = {
    b"icp4": 16,
    b"icp5": 32,
    b"icp6": 64,
    b"ic07": 128,
    b"ic08": 256,
    b"ic09": 512,
    b"ic10": 1024,
    b"ic11": 32,
    b"ic12": 64,
    b"ic13": 256,
    b"ic14": 512,
}


def test_icns_is_a_valid_icon_set():
    data = (PKG / "macos" / "LatentStudio.icns").read_bytes()
    assert data[:4] == b"icns"
    assert struct.unpack(">I", data[4:8])[0] == len(data)
    pos, seen = 8, {}
    while pos < len(data):
        code, length = data[pos : pos + 4], struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        png = data[pos + 8 : pos + length]
        assert code in ICNS_PNG_SIZES, code
        assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
        width, height = struct.unpack(">II", png[16:24])
        assert width == height == ICNS_PNG_SIZES[code], (code, width, height)
        seen[code] = width
        pos += length
    assert pos == len(data)
    assert {16, 32, 128, 256, 512, 1024} <= set(seen.values())


def test_info_plist_matches_the_spec():
    info = plistlib.loads((PKG / "macos" / "Info.plist").read_bytes())
    spec = (PKG / "latent_studio.spec").read_text()
    assert f'NAME = "{info["CFBundleExecutable"]}"' in spec
    assert (PKG / "macos" / info["CFBundleIconFile"]).is_file()
    assert info["CFBundlePackageType"] == "APPL"
    assert re.fullmatch(r"[A-Za-z0-9.-]+", info["CFBundleIdentifier"])
    entitlements = plistlib.loads((PKG / "macos" / "entitlements.plist").read_bytes())
    assert entitlements and all(v is True for v in entitlements.values())
    signing = (PKG / "macos" / "SIGNING.md").read_text()
    assert "codesign" in signing and "notarytool" in signing and "stapler" in signing


# --- the About box -----------------------------------------------------------------------------


@pytest.mark.gui
def test_about_box_shows_the_pyproject_version(qtbot, tmp_path, latent_home, monkeypatch):
    import mlx.core as mx
    from PySide6.QtWidgets import QMessageBox

    from app.gui.main_window import MainWindow
    from app.store import Store

    win = MainWindow(store=Store(tmp_path / "c.sqlite"), autoload=False)
    qtbot.addWidget(win)
    bar_actions = win.menuBar().actions()  # kept alive: PySide6 6.10 ties menu() wrappers to them
    menus = {a.text().replace("&", ""): a.menu() for a in bar_actions}
    assert [a.text() for a in menus["Help"].actions()] == ["About Latent Studio"]
    shown = []
    monkeypatch.setattr(
        QMessageBox, "exec", lambda box: shown.append((box.windowTitle(), box.text()))
    )
    win.about_action.trigger()
    assert len(shown) == 1 and shown[0][0] == "About Latent Studio"
    text = shown[0][1]
    assert f"<td>{project_version()}</td>" in text
    assert f"<td>{mx.__version__}</td>" in text and str(latent_home) in text
