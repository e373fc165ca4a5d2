"""The documentation that ships (docs/): it builds with warnings as errors, and the package cites only it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = [*sorted((ROOT / "fvvae_fast").rglob("*.py")), *sorted((ROOT / "kernels").glob("*.py")),
           *sorted((ROOT / "csrc").rglob("*.[ch]*")), *sorted((ROOT / "tests").glob("*.py"))]


def test_docs_build_with_warnings_as_errors(tmp_path):
    """sphinx-build -W -n: a docstring that does not parse or a reference that does not resolve fails."""
    result = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-W", "-n", "-q", "-E", "-d",
                             str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "html" / "api.html").is_file()


def test_sources_cite_only_shipped_documents():
    """No docstring or comment cites the design notes that are not in the repository; every
    'docs/<page>.rst, "<section>"' cited names a page of docs/ and a section title in it."""
    unshipped = re.compile("DESIGN" + r"(\.md)?,? sections? \d")
    cited = re.compile(r'docs/(\w+)\.rst(?:,\s+"([^"]+)")?')
    for path in SOURCES:
        text = path.read_text()
        assert not unshipped.search(text), f"{path}: cites a document that is not shipped"
        for page, section in cited.findall(text):
            rst = DOCS / f"{page}.rst"
            assert rst.is_file(), f"{path}: cites docs/{page}.rst, which does not exist"
            if section:
                titles = {line.strip() for line in rst.read_text().splitlines()}
                assert " ".join(section.split()) in titles, f"{path}: no section {section!r} in docs/{page}.rst"


def test_api_page_lists_every_public_name():
    import fvvae_fast

    page = (DOCS / "api.rst").read_text()
    for name in [*fvvae_fast.__all__, "FVVAEEncoder"]:
        assert re.search(rf"^\.\. auto\w+:: fvvae_fast\.{name}$", page, flags=re.M), name
