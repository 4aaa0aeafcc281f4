"""Sphinx configuration of the API reference (built in CI with warnings as errors):

    python -m sphinx -W --keep-going -b html docs/api docs/api/_build
"""

project = "fastssl"
author = "fastssl developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
# Docstrings show shapes and formulas; examples are doctest-style but need tensors and models.
suppress_warnings = ["autodoc.import_object"]
