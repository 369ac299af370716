"""Live memory figures for the toolbar: the process's resident memory and MLX's active bytes.

Reads counters only (psutil when installed, else /proc on Linux, else the peak from
`resource`); it never runs model code, so the GUI thread may call it on a timer.
"""

from __future__ import annotations

import os
import sys


def process_rss() -> tuple[int | None, bool]:
    """(bytes resident now, True) or, where only the peak is known, (peak bytes, False)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss), True
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), True
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), False
    except Exception:  # noqa: BLE001 - e.g. Windows
        return None, False


def mlx_active() -> int | None:
    """Bytes MLX holds in arrays right now (None when MLX is not imported yet)."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return None
    try:
        return int(mx.get_active_memory())
    except Exception:  # noqa: BLE001
        return None
