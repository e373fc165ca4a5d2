"""Build the sdist, build a wheel from that sdist alone, and check that both hold what they must.

A file missing from MANIFEST.in is missing from the sdist (the C++ headers: the wheel would then fail
to build); a sub-package missing from setup.py vanishes from the wheel; a failed optional C++ build
leaves the wheel without fvvae_fast._C. Run with the environment's interpreter (its torch builds the
extension, without build isolation; a couple of minutes on 2 cores):

    .venv/bin/python .ci/check_wheel.py
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Files of the source tree the sdist must hold (glob patterns relative to ROOT).
SDIST = ("README.md", "setup.py", "pyproject.toml", "MANIFEST.in", "Makefile", "requirements-data.txt",
         "csrc/**/*.cpp", "csrc/**/*.h", "kernels/*.py", "fvvae_fast/**/*.py", "fvvae_fast/py.typed", "tests/*.py",
         "docs/*.rst", "docs/conf.py")


def python(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def sdist_missing(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    want = {p.relative_to(ROOT).as_posix() for pattern in SDIST for p in ROOT.glob(pattern)}
    return sorted(want - held)


def wheel_missing(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        held = set(whl.namelist())
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fvvae_fast").rglob("__init__.py")}
    want = {f"{package.replace('.', '/')}/__init__.py" for package in packages | {"fvvae_fast.kernels"}}
    want.update({"fvvae_fast/kernels/fisher_accumulate.py", "fvvae_fast/py.typed"})
    missing = sorted(want - held)
    if not any(name.startswith("fvvae_fast/_C") and name.endswith(tuple(EXTENSION_SUFFIXES)) for name in held):
        missing.append("fvvae_fast/_C (the compiled extension)")
    return missing


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        python("setup.py", "-q", "egg_info", "--egg-base", tmp, "sdist", "--dist-dir", tmp)
        (sdist,) = out.glob("*.tar.gz")
        missing = sdist_missing(sdist)
        if missing:
            print(f"check_wheel: {sdist.name} lacks {', '.join(missing)} (MANIFEST.in)", file=sys.stderr)
            return 1
        python("-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--wheel-dir", tmp, str(sdist))
        (wheel,) = out.glob("*.whl")
        missing = wheel_missing(wheel)
        if missing:
            print(f"check_wheel: {wheel.name} lacks {', '.join(missing)}", file=sys.stderr)
            return 1
        print(f"check_wheel: {sdist.name} and {wheel.name} (built from it) hold everything")
    return 0


if __name__ == "__main__":
    sys.exit(main())
