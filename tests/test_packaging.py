"""The wheel carries every module and every template: earlyfw reads its
templates only through importlib.resources, so a file missing from the wheel
is a broken install that an editable checkout would hide."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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


def test_wheel_contains_every_module_and_template(tmp_path: Path) -> None:
    # A copy without build/: setuptools would reuse a stale build/lib and hide
    # a package missing from pyproject.toml.
    source = tmp_path / "src"
    shutil.copytree(
        TOP,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "cache", ".*_cache"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("earlyfw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected_members() - names)
    assert missing == [], f"not in the wheel: {missing}"
