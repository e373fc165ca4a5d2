"""When to show progress, and durations as people read them (no torch import: the command line uses it)."""

from __future__ import annotations

import sys


def show_progress(progress: bool | None) -> bool:
    """Whether to show progress: None shows it on a terminal (or in a notebook), True always, False never."""
    if progress is not None:
        return bool(progress)
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def duration(seconds: float) -> str:
    """"42 s", "14 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
