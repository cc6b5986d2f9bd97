"""Sphinx configuration: the atlasmix API reference from its numpy-style docstrings.

Build (CI does, with warnings as errors): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import shutil
from importlib.metadata import version as _version
from pathlib import Path

project = "atlasmix"
author = "atlasmix contributors"
copyright = "atlasmix contributors"
release = _version("atlasmix")

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# One page per public module (recursive from the stage packages listed in api.md); a module page
# documents the members defined in that module only, so a name re-exported by its package is
# described once.
autosummary_generate = True
# Stubs are generated anew on every build: a stub of a module that was moved or deleted would
# otherwise stay behind and fail the build.
shutil.rmtree(Path(__file__).parent / "generated", ignore_errors=True)
# The stage packages, listed in data-flow order in api.md; the page of the top package lists only
# the other (shared) modules.
STAGES = ["atlasmix.simulate", "atlasmix.store", "atlasmix.ingest", "atlasmix.mixing", "atlasmix.training",
          "atlasmix.evaluation", "atlasmix.study"]
# (both spellings: the template lists a package's submodules by their short names)
autosummary_context = {"stages": STAGES + [s.rsplit(".", 1)[1] for s in STAGES]}
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# A method without a docstring shows none, rather than its base class's (Lightning's and torch's are
# written for their own documentation and do not build here).
autodoc_inherit_docstrings = False

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Parameter types stay text: Sphinx would cross-reference every word of "ndarray, shape (n_cells,
# n_genes)" and find several targets for names such as ``n_cells``.
napoleon_use_param = False

# README.md is included as the user guide: heading anchors for its in-page links.
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"atlasmix {release}"
