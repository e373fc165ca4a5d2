"""Link the FFmpeg shared libraries that PyAV's wheel carries under the names torchcodec loads.

torchcodec needs FFmpeg's libraries (``libavutil.so.60``, ...) from the system; PyAV's wheel
carries its own copies renamed by auditwheel (``av.libs/libavutil-5809ad29.so.60.26.102``). The
test command (``make test``) puts the folder of links this writes on ``LD_LIBRARY_PATH``, so that
the torchcodec decoder's tests run, against the FFmpeg PyAV decodes with, on a machine without
FFmpeg installed. The loader reuses a library it already mapped from the same file, so one process
holds one FFmpeg.

    python tests/pyav_ffmpeg.py FOLDER
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def link_pyav_ffmpeg(folder: Path) -> list[Path]:
    """Symlinks in ``folder``: ``libavutil.so.60`` -> PyAV's ``libavutil-<hash>.so.60.x.y`` (one per FFmpeg
    library), and every library of the wheel under its own name, which FFmpeg's own libraries find
    through their ``$ORIGIN`` run path (the folder of the link). Returns the FFmpeg links; an existing
    folder's links are replaced."""
    import av

    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    ffmpeg = []
    for lib in sorted(libs.glob("lib*.so*")):
        (folder / lib.name).symlink_to(lib)
        m = re.fullmatch(r"(lib(?:av|sw)[a-z]+)-[0-9a-f]+\.so\.(\d+)(?:\.\d+)*", lib.name)
        if m:
            ffmpeg.append(folder / f"{m.group(1)}.so.{m.group(2)}")
            ffmpeg[-1].symlink_to(lib)
    return ffmpeg


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/pyav_ffmpeg.py FOLDER")
    made = link_pyav_ffmpeg(Path(sys.argv[1]))
    print(f"{sys.argv[1]}: {len(made)} FFmpeg libraries of PyAV linked for torchcodec")
