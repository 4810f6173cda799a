"""The real backend: fwpuclnt.dll and iphlpapi.dll through ctypes, Windows only."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from typing import Any

from earlyfw.errors import EarlyfwError
from earlyfw.system import System
from earlyfw.windows.structs import PROTOTYPES


class DllBackend:
    def __init__(self, functions: Mapping[str, Callable[..., Any]]) -> None:
        self.functions = functions


def load() -> DllBackend:
    """Bind every prototype from the DLLs in System32 (by full path, so no
    DLL planted next to earlyfw.exe or in the working directory is loaded)."""
    if not System.WINDOWS.is_current:
        raise EarlyfwError(
            "the Windows Filtering Platform exists only on Windows",
            hint="on this system `earlyfw install --target windows --root DIR` writes the Windows files only",
        )
    system32 = os.path.join(os.environ.get("SYSTEMROOT", r"C:\Windows"), "System32")
    functions: dict[str, Callable[..., Any]] = {}
    for dll, prototypes in PROTOTYPES.items():
        try:
            # typeshed has WinDLL on win32 only, and mypy checks this tree as Linux.
            library = ctypes.WinDLL(os.path.join(system32, f"{dll}.dll"))  # type: ignore[attr-defined,unused-ignore]
        except OSError as e:
            raise EarlyfwError(f"cannot load {dll}.dll: {e}") from None
        for name, (restype, argtypes) in prototypes.items():
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = argtypes
            functions[name] = function
    return DllBackend(functions)
