"""Fixtures for the network-namespace tests (see tests/netns.py), and
earlyfw's Debian packages, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu import package

from tests import netns

# Every netns test needs these; a missing one fails the test with the package
# to install, never skips it.
NETNS_TOOLS = ("ip", "nft", "sysctl")


def require(*tools: str) -> None:
    """Fail (never skip) the calling test when root or one of `tools` (or the
    basic netns tools) is missing, naming the Debian package to install."""
    try:
        netns.require_tools((*NETNS_TOOLS, *tools))
    except netns.NetnsError as e:
        pytest.fail(f"{e}: the netns tests need them (CI installs them all)", pytrace=False)


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    """Namespaces and processes for one test, torn down even when it fails."""
    require()
    with netns.Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def module_lab() -> Iterator[netns.Lab]:
    """The same, shared by a module's tests (building a topology is the slow part)."""
    require()
    with netns.Lab() as lab:
        yield lab


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """earlyfw_<version>_all.deb, built (dpkg-buildpackage) from the tree's tracked and new files."""
    return package.build(tmp_path_factory.mktemp("deb-current"))


@pytest.fixture(scope="session")
def newer_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree as `deb` with a bumped version: what an upgrade installs."""
    return package.build(tmp_path_factory.mktemp("deb-newer"), newer=True)
