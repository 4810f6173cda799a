"""Templates ship inside the package (wheel, editable install, PyInstaller binary
alike) and are only ever read through importlib.resources.

jinja2 is imported on the first render, not with this module, and a template
is compiled from its source then. The frozen build also ships the watcher's
rulesets compiled ahead (jinja2 bytecode, see installer/earlyfw.spec), which
the watcher's first render at boot uses instead of compiling; the source
stays the one truth: the bytecode is used only while its checksum matches the
template's source and its Python version the running one, else the template
is compiled afresh as everywhere else.
"""

from __future__ import annotations

import functools
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

# The top-level template folders, as the packages pyproject.toml maps them to.
FOLDERS = ("payload", "hooks", "units")
# Where the frozen build keeps compiled templates, inside the package, one
# file per template named after jinja2's key for it.
COMPILED = "compiled_templates"
COMPILED_NAME = "%s.cache"


def resource(folder: str, name: str) -> Traversable:
    if folder not in FOLDERS:
        raise ValueError(f"unknown template folder {folder!r}")
    node = resources.files(f"earlyfw.{folder}")
    for part in name.split("/"):
        node = node / part
    return node


def read(folder: str, name: str) -> str:
    return resource(folder, name).read_text(encoding="utf-8")


def _environment(bytecode_cache: jinja2.BytecodeCache) -> jinja2.Environment:
    import jinja2  # noqa: PLC0415 - see the module's docstring

    class Loader(jinja2.BaseLoader):
        def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, None]:
            folder, _, name = template.partition("/")
            try:
                return read(folder, name), None, None
            except (FileNotFoundError, ValueError):
                raise jinja2.TemplateNotFound(template) from None

    # StrictUndefined: a misspelt variable is an error at render time, never an
    # empty string silently dropped into a firewall rule.
    return jinja2.Environment(
        loader=Loader(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - output is nft/shell/unit text, never HTML
        bytecode_cache=bytecode_cache,
    )


@functools.cache
def environment() -> jinja2.Environment:
    import jinja2  # noqa: PLC0415

    class Shipped(jinja2.BytecodeCache):
        """Reads the compiled templates shipped in the package; never writes."""

        def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            try:
                data = (resources.files("earlyfw") / COMPILED / (COMPILED_NAME % bucket.key)).read_bytes()
            except OSError:  # none shipped (wheel, source tree): compiled from the source
                return
            # jinja2 drops it unless its checksum and Python version match.
            bucket.bytecode_from_string(data)

        def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            pass

    return _environment(Shipped())


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)


def compile_into(package: Path, names: list[str]) -> None:
    """Compile templates into the package directory `package` (a staged copy),
    where `environment()` reads them. For the frozen build: the running Python
    must be the one it freezes."""
    import jinja2  # noqa: PLC0415

    directory = package / COMPILED
    directory.mkdir(parents=True, exist_ok=True)
    compiling = _environment(jinja2.FileSystemBytecodeCache(str(directory), COMPILED_NAME))
    for name in names:
        compiling.get_template(name)
    for path in directory.iterdir():
        path.chmod(0o644)  # jinja2 writes 0600; these are read-only data like the templates
