"""The toolbar's live memory figure follows the process: after 200 MB more is resident (a numpy
array, touched page by page) the next timer tick shows at least 150 MB more, read independently
of the app from /proc/self/statm; the model's weight size sits beside it; MLX's active bytes are shown when arrays are held."""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import pytest
from fake_engine import FakeEngine, make_window

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_home(latent_home):
    return latent_home


def statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_live_memory_follows_process(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path / "c.sqlite", FakeEngine(delay=0.0))
    win.mem_timer.setInterval(50)
    qtbot.waitUntil(lambda: win.mem_rss is not None, timeout=10000)
    # Let earlier tests' windows and models be freed first, so the process does not shrink
    # underneath the allocation below.
    import gc

    gc.collect()
    qtbot.wait(500)
    gc.collect()
    before_ref = statm_rss()
    qtbot.waitUntil(lambda: abs(win.mem_rss - statm_rss()) < 50e6, timeout=10000)  # same quantity
    before = before_ref
    # 200 MiB of fresh pages, every one written: an anonymous mmap, so no allocator can hand
    # back memory that is already resident (np.ones reused freed heap here under the full suite).
    block = mmap.mmap(-1, 200 * 2**20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    qtbot.waitUntil(lambda: win.mem_rss - before > 150e6, timeout=15000)  # busy CI: generous
    assert abs(win.mem_rss - statm_rss()) < 50e6
    assert "memory" in win.mem_label.text()
    assert "weights 98.0 MB" in win.mem_label.text()  # FakeInfo.weight_bytes, beside it
    import mlx.core as mx

    held = mx.ones((1024, 1024))  # 4 MiB in MLX
    mx.eval(held)
    qtbot.waitUntil(lambda: (win.mem_mlx or 0) >= 4 * 2**20, timeout=15000)
    assert "MLX arrays now" in win.mem_label.toolTip()
    del held
    block.close()
    win.shutdown()
