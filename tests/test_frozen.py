"""The one-directory PyInstaller build of earlyfw (installer/earlyfw.spec; the
executable `earlyfw` beside _internal/): built once per test session, then
held to the same output as the Python module. test_watch_netns.py runs its
watcher tests against this binary too.

Set EARLYFW_FROZEN=/path/to/earlyfw (the executable in a build's directory) to
test a build made beforehand instead.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import CodeType

import pytest

from tests.doubles import doubles_in
from tests.watch_lab import PYTHON_MODULE

ROOT = Path(__file__).parent.parent
SPEC = ROOT / "installer" / "earlyfw.spec"
EXAMPLE = ROOT / "payload" / "examples" / "earlyfw.toml"


def snapshot(top: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every path under `top`: mode and content (or link target)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        content: bytes | str = (
            os.readlink(path) if path.is_symlink() else "<dir>" if path.is_dir() else path.read_bytes()
        )
        found[str(path.relative_to(top))] = (st.st_mode, content)
    return found


@functools.cache
def frozen_binary() -> Path:
    """Build it (about 30 s on two cores), once per session; the executable."""
    given = os.environ.get("EARLYFW_FROZEN")
    if given:
        return Path(given)
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.fail("PyInstaller is missing: pip install -e '.[build]' (or pip install pyinstaller)", pytrace=False)
    out = Path(tempfile.mkdtemp(prefix="efw-frozen-"))
    atexit.register(shutil.rmtree, out, True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "PyInstaller",
            "--noconfirm",
            "--log-level",
            "WARN",
            "--distpath",
            str(out / "dist"),
            "--workpath",
            str(out / "work"),
            str(SPEC),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"PyInstaller failed:\n{result.stderr[-4000:]}", pytrace=False)
    return out / "dist" / "earlyfw" / "earlyfw"


@pytest.fixture(scope="session")
def frozen() -> tuple[str, ...]:
    return (str(frozen_binary()),)


def run(executable: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*executable, *args], capture_output=True, text=True, check=False)


def test_the_build_is_one_self_contained_directory_run_through_a_link(frozen: tuple[str, ...], tmp_path: Path) -> None:
    """Installed as an image gets it: the directory under lib, a link on PATH
    to its executable. It must not lean on this checkout or this Python: run
    through the link from an empty directory with an environment that points
    nowhere. (A single-file build would unpack itself into TMPDIR on every
    start: the _internal/ directory is what spares that.)"""
    binary = Path(frozen[0])
    assert binary.is_file()
    assert os.access(binary, os.X_OK)
    assert (binary.parent / "_internal").is_dir()
    lib = tmp_path / "usr/local/lib/earlyfw"
    shutil.copytree(binary.parent, lib, symlinks=True)
    link = tmp_path / "usr/local/bin/earlyfw"
    link.parent.mkdir(parents=True)
    link.symlink_to(lib / binary.name)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run(
        [str(link), "--version"],
        cwd=scratch,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(PYTHON_MODULE, "--version").stdout


@pytest.mark.parametrize("state", ["blocked", "relaxed", "initramfs"])
def test_render_matches_the_python_module(frozen: tuple[str, ...], state: str) -> None:
    args = ("--config", str(EXAMPLE), "render", "--state", state)
    frozen_out, python_out = run(frozen, *args), run(PYTHON_MODULE, *args)
    assert frozen_out.returncode == 0, frozen_out.stderr
    assert frozen_out.stdout == python_out.stdout
    assert "table inet earlyfw {" in frozen_out.stdout


def test_install_into_a_root_matches_the_python_module(frozen: tuple[str, ...], tmp_path: Path) -> None:
    """Every template (payload, hooks, units) and every target discovered with
    pkgutil must be inside the binary: the two installs must be identical."""
    trees = {}
    for name, executable in (("frozen", frozen), ("python", PYTHON_MODULE)):
        image = tmp_path / name
        (image / "usr/lib/systemd").mkdir(parents=True)
        (image / "usr/lib/systemd/systemd").touch()  # a systemd image: the unit targets apply
        result = run(executable, "--config", str(EXAMPLE), "install", "--root", str(image))
        assert result.returncode == 0, result.stderr
        trees[name] = snapshot(image)
    assert "etc/systemd/system/earlyfw-watch.service" in trees["frozen"]
    assert "etc/systemd/system/earlyfw-block.service" in trees["frozen"]
    assert trees["frozen"] == trees["python"]


def test_unknown_command_fails_like_the_python_module(frozen: tuple[str, ...]) -> None:
    frozen_out, python_out = run(frozen, "no-such-command"), run(PYTHON_MODULE, "no-such-command")
    assert frozen_out.returncode == python_out.returncode == 2
    assert "No such command" in frozen_out.stderr


class PythonModules:
    """The binary's Python modules, wherever the build put them: the archive
    (PYZ; all of them in the Windows single file) and the .pyc files in
    _internal/ (the one-directory build's, the spec's noarchive). `names`: their
    dotted names; `code(name)`: one's code object."""

    def __init__(self, executable: str) -> None:
        from PyInstaller.archive.readers import CArchiveReader  # type: ignore[import-untyped]  # noqa: PLC0415

        self.archive = CArchiveReader(executable).open_embedded_archive("PYZ.pyz")
        internal = Path(executable).parent / "_internal"
        self.files = {
            ".".join(p.relative_to(internal).with_suffix("").parts).removesuffix(".__init__"): p
            for p in internal.rglob("*.pyc")
        }
        self.names: set[str] = set(self.archive.toc) | set(self.files)

    def code(self, name: str) -> CodeType:
        if name in self.files:
            # A .pyc file: a 16-byte header (magic, flags, source stamp), then the marshalled code.
            loaded = marshal.loads(self.files[name].read_bytes()[16:])  # noqa: S302 - this test's own build
            assert isinstance(loaded, CodeType), name
            return loaded
        extracted: CodeType = self.archive.extract(name)
        return extracted


def test_the_binary_holds_every_module_and_template_but_not_libnftables(frozen: tuple[str, ...]) -> None:
    """Targets (found by pkgutil) and the watcher's lazily imported kernel path
    (pyroute2) are invisible to PyInstaller's import analysis; the spec names
    them. libnftables must come from the system, matching its nft."""
    modules = PythonModules(frozen[0]).names
    internal = Path(frozen[0]).parent / "_internal"
    installed = {
        f"earlyfw.{p.relative_to(ROOT / 'installer' / 'earlyfw').with_suffix('').as_posix().replace('/', '.')}"
        for p in (ROOT / "installer" / "earlyfw").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert installed - modules == set()
    assert {"pyroute2.netlink.generic.wireguard", "earlyfw.payload", "earlyfw.units", "earlyfw.hooks"} <= modules
    shipped = {
        f"earlyfw/{p.relative_to(ROOT).as_posix()}"
        for folder in ("payload", "hooks", "units")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    assert {name for name in shipped if not (internal / name).is_file()} == set()
    assert not [p for p in internal.rglob("*") if "libnftables" in p.name]


def test_the_binary_holds_no_test_double(frozen: tuple[str, ...]) -> None:
    """The product only: no double of tests/ (tests/doubles.py) bundled, left
    in its former home inside the package, or imported by the product."""
    modules = PythonModules(frozen[0])
    assert doubles_in(modules.names, modules.code) == []


def test_the_binary_starts_without_an_archive_to_inflate_or_unused_runtime_hooks(frozen: tuple[str, ...]) -> None:
    """What the watcher's start at boot is spared (installer/earlyfw.spec):
    its modules are files, not zlib entries inflated at every start, and
    PyInstaller's inspect and multiprocessing runtime hooks do not run."""
    from PyInstaller.archive.readers import CArchiveReader  # noqa: PLC0415

    internal = Path(frozen[0]).parent / "_internal"
    assert (internal / "earlyfw" / "linux" / "watcher" / "daemon.pyc").is_file()
    assert (internal / "jinja2" / "environment.pyc").is_file()
    scripts = set(CArchiveReader(frozen[0]).toc)
    assert "pyi_rth_pkgutil" in scripts, "pyroute2 finds its plugins with pkgutil: its hook must stay"
    assert not scripts & {"pyi_rth_inspect", "pyi_rth_multiprocessing"}


def test_the_binary_renders_the_windows_filters(frozen: tuple[str, ...]) -> None:
    """The Windows build is this spec built on Windows; here its bundle must at
    least carry the WFP modules and templates: `windows show` and a Windows
    image install from the binary must match the Python module."""
    args = ("--config", str(EXAMPLE), "windows", "show", "--json")
    frozen_out, python_out = run(frozen, *args), run(PYTHON_MODULE, *args)
    assert frozen_out.returncode == 0, frozen_out.stderr
    assert json.loads(frozen_out.stdout) == json.loads(python_out.stdout)


def test_windows_image_install_matches_the_python_module(frozen: tuple[str, ...], tmp_path: Path) -> None:
    trees = {}
    for name, executable in (("frozen", frozen), ("python", PYTHON_MODULE)):
        image = tmp_path / name
        image.mkdir()
        result = run(executable, "-q", "--config", str(EXAMPLE), "install", "--target", "windows", "--root", str(image))
        assert result.returncode == 0, result.stderr
        trees[name] = snapshot(image)
    task = tmp_path / "frozen" / "ProgramData" / "earlyfw" / "earlyfw-watch.xml"
    assert "windows watch" in task.read_bytes().decode("utf-16")
    assert trees["frozen"] == trees["python"]
