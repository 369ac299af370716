"""Write the macOS icon set (packaging/macos/LatentStudio.icns) from resources/icon.svg.

`python packaging/make_icns.py` renders the SVG with Qt at every size an `.icns` holds and
packs the PNGs into Apple's ICNS container: the magic `icns`, a big-endian u32 total length,
then one chunk per image (4-byte type code, big-endian u32 length including the 8-byte chunk
header, PNG data). Apple's `iconutil` is not needed, so the file builds on Linux too. The
result is committed; run this again after changing the icon.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ICNS = ROOT / "packaging" / "macos" / "LatentStudio.icns"

# ICNS type code -> pixel size of its PNG (the set `iconutil` writes for an .iconset)
ICNS_TYPES: dict[bytes, int] = {
    b"icp4": 16,
    b"icp5": 32,
    b"ic11": 32,
    b"ic12": 64,
    b"ic07": 128,
    b"ic13": 256,
    b"ic08": 256,
    b"ic14": 512,
    b"ic09": 512,
    b"ic10": 1024,
}


def render_png(svg: Path, size: int) -> bytes:
    """The SVG drawn at size x size pixels, as PNG bytes (Qt, offscreen)."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    _app = QGuiApplication.instance() or QGuiApplication([sys.argv[0], "-platform", "offscreen"])
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise ValueError(f"{svg}: not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buf, "PNG")
    buf.close()
    return bytes(data.data())


def pack_icns(images: dict[bytes, bytes]) -> bytes:
    """An ICNS file holding the given (type code -> PNG bytes) chunks, in order."""
    body = b"".join(code + struct.pack(">I", len(png) + 8) + png for code, png in images.items())
    return b"icns" + struct.pack(">I", len(body) + 8) + body


def main() -> int:
    svg = ROOT / "resources" / "icon.svg"
    cache: dict[int, bytes] = {}
    images = {}
    for code, size in ICNS_TYPES.items():
        if size not in cache:
            cache[size] = render_png(svg, size)
        images[code] = cache[size]
    ICNS.write_bytes(pack_icns(images))
    print(f"wrote {ICNS} ({ICNS.stat().st_size} bytes, {len(images)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
