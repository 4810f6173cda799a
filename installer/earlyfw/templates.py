"""Templates ship inside the package (wheel, editable install, PyInstaller binary
alike) and are only ever read through importlib.resources."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

import jinja2

# The top-level template folders, as the packages pyproject.toml maps them to.
FOLDERS = ("payload", "hooks", "units")


def resource(folder: str, name: str) -> Traversable:
    if folder not in FOLDERS:
        raise ValueError(f"unknown template folder {folder!r}")
    node = resources.files(f"earlyfw.{folder}")
    for part in name.split("/"):
        node = node / part
    return node


def read(folder: str, name: str) -> str:
    return resource(folder, name).read_text(encoding="utf-8")


class _Loader(jinja2.BaseLoader):
    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, None]:
        folder, _, name = template.partition("/")
        try:
            return read(folder, name), None, None
        except (FileNotFoundError, ValueError):
            raise jinja2.TemplateNotFound(template) from None


# StrictUndefined: a misspelt variable is an error at render time, never an
# empty string silently dropped into a firewall rule.
ENVIRONMENT = jinja2.Environment(
    loader=_Loader(),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,  # noqa: S701 - output is nft/shell/unit text, never HTML
)


def render(template: str, **context: object) -> str:
    return ENVIRONMENT.get_template(template).render(**context)
