"""Sphinx configuration of the fvvae_fast documentation: ``make docs`` (or ``sphinx-build -W -n docs out``).

Offline by design: no intersphinx, so names of torch, NumPy and scikit-learn are not linked (they are
listed in ``nitpick_ignore_regex``); every reference to this package must resolve (``-n``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fvvae_fast  # noqa: E402

project = "fvvae_fast"
release = version = fvvae_fast.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = True
# Outside this package: nothing to link to without intersphinx (which would fetch inventories).
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|np|numpy|nn|sklearn|scipy|sqlite3|argparse|pathlib|os|collections|typing|types"
               r"|concurrent)\b.*"),
    (r"py:.*", r"(Tensor|Module|Parameter|Generator|Path|PathLike|Sequence|Iterator|Iterable|Callable|Mapping|Any"
               r"|ndarray|ArrayLike|dtype|device)"),
    (r"py:class", r"(list|dict|tuple)\[.*"),  # a nested annotation of a dataclass field, split by autodoc
]


class CommandHelp(SphinxDirective):
    """``.. fvvae-help:: STAGE``: the help of ``fvvae STAGE --help`` (no argument: ``fvvae --help``), generated
    from the parser itself so that the page and the command line cannot disagree."""

    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        from fvvae_fast.cli import build_parser

        command = self.arguments[0] if self.arguments else ""
        parser = build_parser(command)
        if command:
            parser = next(a for a in parser._subparsers._group_actions).choices[command]
        formatter = parser.formatter_class
        parser.formatter_class = lambda prog: formatter(prog, width=100)  # the same page on any terminal
        text = parser.format_help()
        return [nodes.literal_block(text, text)]


def setup(app) -> dict:
    app.add_directive("fvvae-help", CommandHelp)
    return {"parallel_read_safe": True}
