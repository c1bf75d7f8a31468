"""Sphinx configuration of the gqsgd_jax documentation.

Built by scripts/docs.sh with warnings as errors (``-W``); pages are MyST
Markdown, the API reference comes from the docstrings (autodoc, Google
style through napoleon).
"""

import os
import sys

# The package itself is imported by autodoc: from the checkout, so that a
# docs build needs no install beyond the docs extra and jax.
sys.path.insert(0, os.path.abspath(".."))
# No accelerator or compiled module is needed to read docstrings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "gqsgd_jax"
author = "The gqsgd_jax authors"
copyright = "2026, The gqsgd_jax authors"  # pylint: disable=redefined-builtin

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_default_options = {"members": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Type hints name library classes (optax, jax) that are not documented here:
# they are shown as text, not cross-referenced.
nitpicky = False

html_theme = "furo"
html_title = "gqsgd_jax"
