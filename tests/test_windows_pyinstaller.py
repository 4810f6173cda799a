"""payload/windows/earlyfw.spec builds a working one-file earlyfw.

PyInstaller cannot cross-build, so earlyfw.exe itself is built on Windows (see
README, Windows). The spec is platform-neutral, though: built here it makes a
native binary from the same Analysis, and that binary must carry the
templates (read through importlib.resources) and every target module
(imported by pkgutil, invisible to PyInstaller's import scan). On Windows,
`dist\\earlyfw.exe windows show` is the same check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from earlyfw import config as configuration
from earlyfw.wfp import rules

REPO = Path(__file__).parent.parent
SPEC = REPO / "payload" / "windows" / "earlyfw.spec"
EXAMPLE = REPO / "payload" / "examples" / "earlyfw.toml"


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.fail(
            "PyInstaller is missing: pip install pyinstaller (the `build` extra; CI installs it)", pytrace=False
        )
    work = tmp_path_factory.mktemp("pyinstaller")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "PyInstaller",
            "--noconfirm",
            "--log-level=WARN",
            "--workpath",
            str(work / "build"),
            "--distpath",
            str(work / "dist"),
            str(SPEC),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return work / "dist" / "earlyfw"


def run(binary: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Away from the source tree and without PYTHONPATH: only the bundle counts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, check=False, cwd=cwd, env=env)


def test_the_bundle_renders_the_filters(binary: Path, tmp_path: Path) -> None:
    result = run(binary, "--config", str(EXAMPLE), "windows", "show", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == rules.describe(configuration.load(EXAMPLE))


def test_the_bundle_carries_the_templates_and_targets(binary: Path, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    result = run(
        binary, "-q", "--config", str(EXAMPLE), "install", "--target", "windows", "--root", str(image), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    task = image / "ProgramData" / "earlyfw" / "earlyfw-watch.xml"
    assert "windows watch" in task.read_bytes().decode("utf-16")
    assert (image / "etc" / "earlyfw" / "blocked.nft").exists()  # the nft template, too
