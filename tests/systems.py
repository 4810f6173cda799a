"""Running as if on another system: the platform seam's one override."""

from __future__ import annotations

import pytest

from earlyfw.system import System


def force(monkeypatch: pytest.MonkeyPatch, system: System) -> None:
    """Make System.current() answer `system` for the rest of the test; every
    platform decision in earlyfw asks it, so nothing else needs patching."""
    monkeypatch.setattr(System, "current", classmethod(lambda cls: system))
