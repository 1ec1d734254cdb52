"""Sphinx configuration."""

import ast
import contextlib
import importlib
import inspect
import pkgutil
from importlib.metadata import metadata as _metadata
from importlib.metadata import version as _version

import flask_celery_ctx

project = "Flask-Celery-Ctx"
copyright = "Flask-Celery-Ctx contributors"
release = _version("Flask-Celery-Ctx")
version = ".".join(release.split(".")[:2])

# The project's links, as pyproject.toml gives them: ``Source`` becomes the
# target `source`_, ``Issue Tracker`` the target `issue tracker`_.
_urls = (
    entry.split(", ", 1)
    for entry in _metadata("Flask-Celery-Ctx").get_all("Project-URL") or ()
)
rst_epilog = "".join(f"\n.. _{label.lower()}: {url}" for label, url in _urls)

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


def _import_type_checking_names() -> None:
    """Run the ``if t.TYPE_CHECKING:`` imports of each module of the package
    in its namespace, now that every module is loaded: autodoc can then
    evaluate the annotations, and shows the types (``Any``,
    ``AsyncResult[Any]``) rather than their source text (``t.Any``)."""
    prefix = f"{flask_celery_ctx.__name__}."
    for info in pkgutil.walk_packages(flask_celery_ctx.__path__, prefix):
        module = importlib.import_module(info.name)
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith(
                "TYPE_CHECKING"
            ):
                code = compile(ast.Module(node.body, []), module.__file__, "exec")
                exec(code, vars(module))
        # autodoc evaluates the annotations of functions, not those of a
        # class's constructor: give it the evaluated signature.
        for cls in vars(module).values():
            if inspect.isclass(cls) and cls.__module__ == module.__name__:
                with contextlib.suppress(TypeError, ValueError, NameError):
                    cls.__signature__ = inspect.signature(cls, eval_str=True)


_import_type_checking_names()
