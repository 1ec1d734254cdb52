"""Sphinx configuration."""

from importlib.metadata import version as _version

project = "Flask-Celery-Ctx"
copyright = "Flask-Celery-Ctx contributors"
release = _version("Flask-Celery-Ctx")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Celery's docstrings link to labels of Celery's own docs.
autodoc_inherit_docstrings = False
# Some names in signatures come from packages whose docs are not linked here.
nitpicky = False

html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = f"Flask-Celery-Ctx {version}"
exclude_patterns = ["_build"]
