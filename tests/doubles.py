"""The test doubles, and how to find one in a build: the product ships only
the product, so the wheel (test_packaging.py) and the binary (test_frozen.py)
are both held to `doubles_in`.

The doubles live in tests/ and reach the code through its seams (the Runner,
the WFP Backend; pf evaluation is the tests' alone). Each was once part of the
package, which is where a careless move would put it back.
"""

from __future__ import annotations

import dis
from collections.abc import Callable, Collection, Iterator
from types import CodeType

DOUBLE_MODULES = ("wfp_model", "recording_runner", "pf_evaluator")
# Where each double lived in the package: the whole module, or the names it defined there.
FORMER_MODULE = "earlyfw.windows.recording"
FORMER_NAMES = {"earlyfw.run": {"RecordingRunner"}, "earlyfw.macos.pf": {"evaluate", "Packet"}}


def top_level_names(code: CodeType) -> set[str]:
    """The names a module's own code binds: its classes, functions, constants and imports."""
    return {str(i.argval) for i in dis.get_instructions(code) if i.opname in ("STORE_NAME", "STORE_GLOBAL")}


def imported_modules(code: CodeType) -> set[str]:
    """Every module an import statement names, anywhere in the module (functions' lazy imports too)."""
    return {str(i.argval) for c in _code_objects(code) for i in dis.get_instructions(c) if i.opname == "IMPORT_NAME"}


def _code_objects(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_objects(const)


def is_double(module: str) -> bool:
    return module == FORMER_MODULE or module.partition(".")[0] == "tests" or module.rpartition(".")[2] in DOUBLE_MODULES


def doubles_in(modules: Collection[str], code: Callable[[str], CodeType]) -> list[str]:
    """What of the doubles a build holds. `modules`: the dotted names of its
    modules; `code(name)`: one module's code object."""
    found = [f"module {name}" for name in sorted(modules) if is_double(name)]
    for name in sorted(m for m in modules if m.partition(".")[0] == "earlyfw"):
        module = code(name)
        found += [f"{name} defines {n}" for n in sorted(top_level_names(module) & FORMER_NAMES.get(name, set()))]
        found += [f"{name} imports {m}" for m in sorted(imported_modules(module)) if is_double(m)]
    return found
