"""The wheel carries every module and every template: earlyfw reads its
templates only through importlib.resources, so a file missing from the wheel
is a broken install that an editable checkout would hide. And it carries
nothing else: no test double (tests/doubles.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import CodeType

import pytest

from tests.doubles import FORMER_MODULE, doubles_in

TOP = Path(__file__).parent.parent
TEMPLATE_FOLDERS = {"payload": "earlyfw/payload", "hooks": "earlyfw/hooks", "units": "earlyfw/units"}


def expected_members() -> set[str]:
    members = {
        "earlyfw/" + str(p.relative_to(TOP / "installer/earlyfw"))
        for p in (TOP / "installer/earlyfw").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    for folder, package in TEMPLATE_FOLDERS.items():
        members |= {
            f"{package}/{p.relative_to(TOP / folder)}"
            for p in (TOP / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
    return members


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """Built once for this file's tests, with pip (in an isolated build
    environment, as any user's `pip install .` would)."""
    out = tmp_path_factory.mktemp("wheel")
    # A copy without build/: setuptools would reuse a stale build/lib and hide
    # a package missing from pyproject.toml.
    source = out / "src"
    shutil.copytree(
        TOP,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "cache", ".*_cache"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("earlyfw-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_contains_every_module_and_template(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    missing = sorted(expected_members() - names)
    assert missing == [], f"not in the wheel: {missing}"


def python_modules(members: list[str]) -> dict[str, str]:
    """Dotted module name -> member, for the .py files of a wheel."""
    return {m.removesuffix(".py").removesuffix("/__init__").replace("/", "."): m for m in members if m.endswith(".py")}


def test_wheel_holds_no_test_double(wheel: zipfile.ZipFile) -> None:
    modules = python_modules(wheel.namelist())

    def code(name: str) -> CodeType:
        return compile(wheel.read(modules[name]), modules[name], "exec")

    assert doubles_in(modules, code) == []


def test_the_double_check_finds_a_double_in_its_former_home() -> None:
    """The control: each double compiled as the module it once was inside
    the package, and one product module importing a double, are all found."""
    former = {
        FORMER_MODULE: TOP / "tests" / "wfp_model.py",
        "earlyfw.run": TOP / "tests" / "recording_runner.py",
        "earlyfw.macos.pf": TOP / "tests" / "pf_evaluator.py",
    }
    sources = {name: path.read_text() for name, path in former.items()}
    sources["earlyfw.cli"] = "def main() -> None:\n    from tests.recording_runner import RecordingRunner\n"

    def code(name: str) -> CodeType:
        return compile(sources[name], name, "exec")

    assert doubles_in(sources, code) == [
        f"module {FORMER_MODULE}",
        "earlyfw.cli imports tests.recording_runner",
        "earlyfw.macos.pf defines Packet",
        "earlyfw.macos.pf defines evaluate",
        "earlyfw.run defines RecordingRunner",
    ]
