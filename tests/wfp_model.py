"""A recording model of the Base Filtering Engine, for running the WFP code
where there is no Windows. The engine takes it as its `Backend`
(earlyfw.windows.engine); as a test double it ships in neither the wheel nor
the binary.

Each function is a Python callable wrapped in the same C prototype as the real
one (`structs.PROTOTYPES`), so the engine's calls cross a real ctypes foreign
call: arguments are converted by the argtypes exactly as for fwpuclnt.dll, and
the model decodes every structure back from the pointers it is given. It keeps
providers, sublayers and filters with BFE's documented rules (transactions,
lifetimes, references, types per condition field), so a wrong structure or
call order fails here as it would on Windows. It also models what earlyfw
relies on around BFE: which condition fields each layer offers, app IDs
(FwpmGetAppIdFromFileName0 of the files it is told exist, and how BFE
compares one with a socket's process image), dynamic
sessions whose filters vanish with their process, BFE restarts, adapters
(the interface type inside a LUID, GetIfEntry2's row) and the security
descriptors of files (SDDL in and out, SetFileSecurityW not propagating to
children). What it cannot show is enforcement: that only a Windows host can
(see tests/test_windows_engine.py).
"""

from __future__ import annotations

import copy
import ctypes
import ipaddress
import itertools
import os
import struct
import uuid
from collections.abc import Callable, Mapping
from ctypes import CFUNCTYPE, POINTER
from dataclasses import dataclass, field
from typing import Any

from earlyfw import config as configuration
from earlyfw.windows import security
from earlyfw.windows import structs as s

Decoded = (
    int
    | ipaddress.IPv4Address
    | ipaddress.IPv6Address
    | ipaddress.IPv4Network
    | ipaddress.IPv6Network
    | security.Descriptor
    | bytes
)

LAYERS = {
    s.FWPM_LAYER_ALE_AUTH_CONNECT_V4: 4,
    s.FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4: 4,
    s.FWPM_LAYER_ALE_AUTH_CONNECT_V6: 6,
    s.FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6: 6,
    s.FWPM_LAYER_IPFORWARD_V4: 4,
    s.FWPM_LAYER_IPFORWARD_V6: 6,
}
ALE_LAYERS = frozenset(list(LAYERS)[:4])
# The NT device each drive letter names on the modelled host.
VOLUMES = {"C": r"\Device\HarddiskVolume3", "D": r"\Device\HarddiskVolume5"}
# The executables on the modelled host's disk, by Win32 path.
FILES = (
    configuration.DEFAULT_OPENVPN_PROGRAM,
    r"C:\Program Files\WireGuard\wireguard.exe",
    r"C:\Windows\System32\curl.exe",
)
ERROR_FILE_NOT_FOUND = 2
ERROR_INVALID_HANDLE = 6
ERROR_INVALID_PARAMETER = 87
FWP_E_MATCH_TYPE_MISMATCH = 0x80320026
FWP_E_DYNAMIC_SESSION_IN_PROGRESS = 0x8032000B
# A standard user's SID: the owner of what users create under ProgramData.
USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1001"
# What a file or directory created under C:\ProgramData gets by inheritance:
# owned by its creator, and Users may create files and folders there.
PROGRAMDATA_DEFAULT = security.Descriptor(
    USER_SID,
    (
        security.Ace(security.SYSTEM, security.FILE_ALL_ACCESS, 0x13),
        security.Ace(security.ADMINISTRATORS, security.FILE_ALL_ACCESS, 0x13),
        security.Ace(security.USERS, 0x1200A9, 0x13),
        security.Ace(security.USERS, 0x116, 0x12),  # create files, folders, write attributes
    ),
)


@dataclass(frozen=True)
class Adapter:
    """One network adapter as GetIfEntry2 reports it."""

    description: str = "Wintun Userspace Tunnel"
    hardware: bool = False
    up: bool = True


@dataclass(frozen=True)
class Provider:
    key: uuid.UUID
    name: str
    description: str | None
    flags: int
    service_name: str | None


@dataclass(frozen=True)
class Sublayer:
    key: uuid.UUID
    name: str
    flags: int
    provider: uuid.UUID | None
    weight: int


@dataclass(frozen=True)
class Condition:
    field: uuid.UUID
    match: int
    type: int
    value: Decoded


@dataclass(frozen=True)
class DecodedFilter:
    key: uuid.UUID
    name: str
    description: str | None
    flags: int
    provider: uuid.UUID | None
    layer: uuid.UUID
    sublayer: uuid.UUID
    weight_type: int
    weight: int | None
    conditions: tuple[Condition, ...]
    action: int
    id: int = 0
    # The dynamic session that added it: BFE deletes it when that session ends.
    session: int | None = None


@dataclass
class Store:
    providers: dict[uuid.UUID, Provider] = field(default_factory=dict)
    sublayers: dict[uuid.UUID, Sublayer] = field(default_factory=dict)
    filters: dict[uuid.UUID, DecodedFilter] = field(default_factory=dict)
    # Boot-time filters from an earlier boot that BFE no longer lists, but
    # tcpip.sys still loads (see RecordingBfe.reboot).
    boot_records: dict[uuid.UUID, DecodedFilter] = field(default_factory=dict)


class _Failed(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def app_id(path: str) -> bytes:
    """What FwpmGetAppIdFromFileName0 returns, and what BFE computes for the
    image of the process that opens a socket: the file's NT path (the drive
    letter replaced by its volume device), lowercased, as UTF-16LE with its
    terminating NUL. So the same file matches however its path is spelled in
    case, and a copy of it elsewhere does not."""
    drive, rest = path[:1].upper(), path[2:]
    return (VOLUMES[drive] + rest).lower().encode("utf-16-le") + b"\0\0"


def app_id_matches(value: bytes, image: str) -> bool:
    """ALE_APP_ID with FWP_MATCH_EQUAL: the blobs compared byte for byte."""
    return value == app_id(image)


def _uuid(guid: s.GUID) -> uuid.UUID:
    return guid.to_uuid()


def _optional_uuid(pointer: Any) -> uuid.UUID | None:
    return pointer.contents.to_uuid() if pointer else None


def decode_condition(c: s.FWPM_FILTER_CONDITION0) -> Condition:
    v = c.conditionValue
    kind = int(v.type)
    value: Decoded
    if kind == s.FWP_UINT8:
        value = int(v.uint8)
    elif kind == s.FWP_UINT16:
        value = int(v.uint16)
    elif kind == s.FWP_UINT32:
        value = int(v.uint32)
    elif kind == s.FWP_UINT64:
        value = int(v.uint64[0])
    elif kind == s.FWP_BYTE_ARRAY16_TYPE:
        value = ipaddress.IPv6Address(bytes(v.byteArray16.contents.byteArray16))
    elif kind == s.FWP_V4_ADDR_MASK:
        mask = v.v4AddrMask.contents
        # strict: an address with host bits under the mask is an encoding bug.
        address, netmask = ipaddress.IPv4Address(int(mask.addr)), ipaddress.IPv4Address(int(mask.mask))
        value = ipaddress.IPv4Network(f"{address}/{netmask}")
    elif kind == s.FWP_V6_ADDR_MASK:
        mask6 = v.v6AddrMask.contents
        value = ipaddress.IPv6Network((bytes(mask6.addr), int(mask6.prefixLength)))
    elif kind == s.FWP_BYTE_BLOB_TYPE:
        if not v.byteBlob or not v.byteBlob.contents.size:
            raise _Failed(s.FWP_E_INVALID_PARAMETER)
        value = ctypes.string_at(v.byteBlob.contents.data, v.byteBlob.contents.size)
    elif kind == s.FWP_SECURITY_DESCRIPTOR_TYPE:
        blob = v.sd.contents
        try:
            value = security.Descriptor.from_bytes(ctypes.string_at(blob.data, blob.size))
        except (security.SecurityError, ValueError, struct.error):
            raise _Failed(s.FWP_E_INVALID_PARAMETER) from None
    else:
        raise _Failed(s.FWP_E_TYPE_MISMATCH)
    return Condition(_uuid(c.fieldKey), int(c.matchType), kind, value)


def decode_filter(f: s.FWPM_FILTER0) -> DecodedFilter:
    weight_type = int(f.weight.type)
    weight: int | None
    if weight_type == s.FWP_EMPTY:
        weight = None
    elif weight_type == s.FWP_UINT8:
        weight = int(f.weight.uint8)
    elif weight_type == s.FWP_UINT64:
        weight = int(f.weight.uint64[0])
    else:
        raise _Failed(s.FWP_E_INVALID_WEIGHT)
    count = int(f.numFilterConditions)
    if count and not f.filterCondition:
        raise _Failed(s.FWP_E_INVALID_PARAMETER)
    return DecodedFilter(
        key=_uuid(f.filterKey),
        name=f.displayData.name,
        description=f.displayData.description,
        flags=int(f.flags),
        provider=_optional_uuid(f.providerKey),
        layer=_uuid(f.layerKey),
        sublayer=_uuid(f.subLayerKey),
        weight_type=weight_type,
        weight=weight,
        conditions=tuple(decode_condition(f.filterCondition[i]) for i in range(count)),
        action=int(f.action.type),
    )


# What each condition field accepts at the ALE layers: (IP version or None,
# data type, match types).
_EQUAL = {s.FWP_MATCH_EQUAL}
_FLAGS = {s.FWP_MATCH_FLAGS_ALL_SET, 7, 8}  # ALL_SET, ANY_SET, NONE_SET
_FIELD_TYPES: dict[uuid.UUID, list[tuple[int | None, int, set[int]]]] = {
    s.FWPM_CONDITION_ALE_USER_ID: [(None, s.FWP_SECURITY_DESCRIPTOR_TYPE, _EQUAL)],
    s.FWPM_CONDITION_ALE_APP_ID: [(None, s.FWP_BYTE_BLOB_TYPE, _EQUAL)],
    s.FWPM_CONDITION_IP_FORWARD_INTERFACE: [(None, s.FWP_UINT64, _EQUAL)],
    s.FWPM_CONDITION_IP_ARRIVAL_INTERFACE: [(None, s.FWP_UINT64, _EQUAL)],
    s.FWPM_CONDITION_IP_PROTOCOL: [(None, s.FWP_UINT8, _EQUAL)],
    s.FWPM_CONDITION_IP_LOCAL_PORT: [(None, s.FWP_UINT16, _EQUAL)],
    s.FWPM_CONDITION_IP_REMOTE_PORT: [(None, s.FWP_UINT16, _EQUAL)],
    s.FWPM_CONDITION_IP_LOCAL_INTERFACE: [(None, s.FWP_UINT64, _EQUAL)],
    s.FWPM_CONDITION_FLAGS: [(None, s.FWP_UINT32, _FLAGS)],
    s.FWPM_CONDITION_IP_REMOTE_ADDRESS: [
        (4, s.FWP_UINT32, _EQUAL),
        (4, s.FWP_V4_ADDR_MASK, _EQUAL),
        (6, s.FWP_BYTE_ARRAY16_TYPE, _EQUAL),
        (6, s.FWP_V6_ADDR_MASK, _EQUAL),
    ],
}


# Which fields each layer offers (the "Filtering conditions available at each
# filtering layer" page): the ALE fields exist only at the ALE layers, the
# forwarding interfaces only at IPFORWARD. BFE refuses a condition on a field
# the layer does not have.
_ALE_FIELDS = frozenset(_FIELD_TYPES) - {s.FWPM_CONDITION_IP_FORWARD_INTERFACE, s.FWPM_CONDITION_IP_ARRIVAL_INTERFACE}
_FORWARD_FIELDS = frozenset(
    {
        s.FWPM_CONDITION_IP_FORWARD_INTERFACE,
        s.FWPM_CONDITION_IP_ARRIVAL_INTERFACE,
        s.FWPM_CONDITION_IP_PROTOCOL,
        s.FWPM_CONDITION_FLAGS,
    }
)


def _check_condition(condition: Condition, layer: uuid.UUID) -> None:
    version = LAYERS[layer]
    accepted = _FIELD_TYPES.get(condition.field)
    if accepted is None or condition.field not in (_ALE_FIELDS if layer in ALE_LAYERS else _FORWARD_FIELDS):
        raise _Failed(s.FWP_E_CONDITION_NOT_FOUND)
    matching = [a for a in accepted if a[0] in (None, version) and a[1] == condition.type]
    if not matching:
        raise _Failed(s.FWP_E_TYPE_MISMATCH)
    if condition.match not in matching[0][2]:
        raise _Failed(FWP_E_MATCH_TYPE_MISMATCH)


def _persistent(flags: int) -> bool:
    return bool(flags & 0x1)


class RecordingBfe:
    """The model. `functions` is the Backend; `calls` records every call."""

    def __init__(
        self,
        *,
        aliases: Mapping[str, int] | None = None,
        adapters: Mapping[int, Adapter] | None = None,
        files: tuple[str, ...] = FILES,
    ) -> None:
        self.aliases = dict(aliases or {})
        # Executables on disk (Win32 paths; the file system ignores case).
        self.files = {f.lower() for f in files}
        # By LUID; an alias without an entry here is a wintun adapter that is up.
        self.adapters = dict(adapters or {})
        # Security descriptors by path; a path on disk without one has what
        # ProgramData hands down (PROGRAMDATA_DEFAULT).
        self.security: dict[str, security.Descriptor] = {}
        self.local: dict[int, object] = {}  # LocalAlloc'd buffers handed out
        self.dynamic: set[int] = set()  # handles of dynamic sessions
        self.store = Store()  # what is committed
        self.txn: Store | None = None
        self.calls: list[tuple[str, Any]] = []
        # Exceptions raised inside a callback (ctypes would swallow them).
        self.errors: list[BaseException] = []
        self.failures: dict[str, list[tuple[int, int]]] = {}
        self.counts: dict[str, int] = {}
        self.handles: set[int] = set()
        self.enums: dict[int, list[Any]] = {}
        self.allocations: dict[int, object] = {}
        self._ids = itertools.count(0x10000)
        self._handles = itertools.count(0xB0E0)
        self.functions: dict[str, Callable[..., Any]] = {}
        self._callbacks: list[object] = []
        for prototypes in s.PROTOTYPES.values():
            for name, (restype, argtypes) in prototypes.items():
                callback = CFUNCTYPE(restype, *argtypes)(self._wrap(name, getattr(self, f"_{name}")))
                self._callbacks.append(callback)
                self.functions[name] = callback

    # -- test controls ---------------------------------------------------

    def fail(self, name: str, code: int, *, nth: int = 1) -> None:
        """Make the nth call (counted from now) of `name` fail with `code`."""
        self.failures.setdefault(name, []).append((self.counts.get(name, 0) + nth, code))

    def reboot(self, *, hide_boottime: bool = True) -> None:
        """What survives a reboot: persistent objects, and the boot-time
        filters, which tcpip.sys enforces until BFE starts. With `hide_boottime`
        BFE no longer lists the boot-time filters afterwards (their key answers
        FWP_E_FILTER_NOT_FOUND) while their records stay: the pessimistic case
        earlyfw's uninstall has to handle."""
        if self.txn is not None:
            self.txn = None
        st = self.store
        boot = {k: f for k, f in st.filters.items() if f.flags & s.FWPM_FILTER_FLAG_BOOTTIME}
        st.filters = {k: f for k, f in st.filters.items() if _persistent(f.flags) or (k in boot and not hide_boottime)}
        if hide_boottime:
            st.boot_records.update(boot)
        st.providers = {k: p for k, p in st.providers.items() if _persistent(p.flags)}
        st.sublayers = {k: sl for k, sl in st.sublayers.items() if _persistent(sl.flags)}
        self.handles.clear()

    def restart(self) -> None:
        """BFE restarts (service restart, crash): every session ends, and
        only persistent and boot-time objects come back."""
        self.reboot(hide_boottime=False)
        self.dynamic.clear()

    def process_exit(self) -> None:
        """The process holding the dynamic sessions dies: BFE ends them, and
        deletes what they added, as it does for a closed dynamic session."""
        for handle in sorted(self.dynamic):
            self._end(handle)

    def _end(self, handle: int) -> None:
        if handle in self.dynamic:
            self.dynamic.discard(handle)
            self.store.filters = {k: f for k, f in self.store.filters.items() if f.session != handle}
        self.handles.discard(handle)

    def descriptor(self, path: str) -> security.Descriptor:
        return self.security.get(path, PROGRAMDATA_DEFAULT)

    def boot_policy(self) -> list[DecodedFilter]:
        """What tcpip.sys would enforce before BFE on the next boot
        (`netsh wfp show boottimepolicy`)."""
        live = [f for f in self.store.filters.values() if f.flags & s.FWPM_FILTER_FLAG_BOOTTIME]
        return sorted([*live, *self.store.boot_records.values()], key=lambda f: str(f.key))

    def filters(self) -> list[DecodedFilter]:
        """Committed filters BFE lists (`netsh wfp show filters`)."""
        return sorted(self.store.filters.values(), key=lambda f: str(f.key))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # -- plumbing ----------------------------------------------------------

    def _wrap(self, name: str, impl: Callable[..., int | None]) -> Callable[..., int | None]:
        def call(*args: Any) -> int | None:
            self.counts[name] = self.counts.get(name, 0) + 1
            for nth, code in self.failures.get(name, []):
                if nth == self.counts[name]:
                    self.calls.append((name, f"injected {code:#x}"))
                    return code
            try:
                return impl(*args)
            except _Failed as e:
                return e.code
            except BaseException as e:  # ctypes would print it and return 0
                self.errors.append(e)
                return s.FWP_E_INVALID_PARAMETER

        return call

    @property
    def _state(self) -> Store:
        return self.txn if self.txn is not None else self.store

    def _session(self, handle: int | None) -> None:
        if handle not in self.handles:
            raise _Failed(ERROR_INVALID_HANDLE)

    # -- fwpuclnt.dll ------------------------------------------------------

    def _FwpmEngineOpen0(self, server: str | None, authn: int, identity: int | None, session: Any, out: Any) -> int:
        if server is not None or identity is not None or authn not in (s.RPC_C_AUTHN_WINNT, 0xFFFFFFFF):
            raise _Failed(ERROR_INVALID_PARAMETER)
        decoded = session.contents if session else None
        self.calls.append(("FwpmEngineOpen0", decoded.displayData.name if decoded else None))
        handle = next(self._handles)
        self.handles.add(handle)
        if decoded is not None and decoded.flags & s.FWPM_SESSION_FLAG_DYNAMIC:
            self.dynamic.add(handle)
        out[0] = handle
        return 0

    def _FwpmEngineClose0(self, handle: int | None) -> int:
        self._session(handle)
        self.calls.append(("FwpmEngineClose0", None))
        self.txn = None  # BFE aborts a transaction its session leaves open
        self._end(handle or 0)
        return 0

    def _FwpmTransactionBegin0(self, handle: int | None, flags: int) -> int:
        self._session(handle)
        self.calls.append(("FwpmTransactionBegin0", flags))
        if self.txn is not None:
            raise _Failed(s.FWP_E_TXN_IN_PROGRESS)
        self.txn = copy.deepcopy(self.store)
        return 0

    def _FwpmTransactionCommit0(self, handle: int | None) -> int:
        self._session(handle)
        self.calls.append(("FwpmTransactionCommit0", None))
        if self.txn is None:
            raise _Failed(s.FWP_E_NO_TXN_IN_PROGRESS)
        self.store, self.txn = self.txn, None
        return 0

    def _FwpmTransactionAbort0(self, handle: int | None) -> int:
        self._session(handle)
        self.calls.append(("FwpmTransactionAbort0", None))
        if self.txn is None:
            raise _Failed(s.FWP_E_NO_TXN_IN_PROGRESS)
        self.txn = None
        return 0

    def _FwpmProviderAdd0(self, handle: int | None, provider: Any, sd: int | None) -> int:
        self._session(handle)
        p = provider.contents
        decoded = Provider(
            _uuid(p.providerKey), p.displayData.name, p.displayData.description, int(p.flags), p.serviceName
        )
        self.calls.append(("FwpmProviderAdd0", decoded))
        if not decoded.name:
            raise _Failed(s.FWP_E_INVALID_PARAMETER)
        if decoded.key in self._state.providers:
            raise _Failed(s.FWP_E_ALREADY_EXISTS)
        self._state.providers[decoded.key] = decoded
        return 0

    def _FwpmSubLayerAdd0(self, handle: int | None, sublayer: Any, sd: int | None) -> int:
        self._session(handle)
        sl = sublayer.contents
        decoded = Sublayer(
            _uuid(sl.subLayerKey), sl.displayData.name, int(sl.flags), _optional_uuid(sl.providerKey), int(sl.weight)
        )
        self.calls.append(("FwpmSubLayerAdd0", decoded))
        state = self._state
        if not decoded.name:
            raise _Failed(s.FWP_E_INVALID_PARAMETER)
        if decoded.key in state.sublayers:
            raise _Failed(s.FWP_E_ALREADY_EXISTS)
        if decoded.provider is not None:
            if decoded.provider not in state.providers:
                raise _Failed(s.FWP_E_PROVIDER_NOT_FOUND)
            if _persistent(decoded.flags) and not _persistent(state.providers[decoded.provider].flags):
                raise _Failed(s.FWP_E_LIFETIME_MISMATCH)
        state.sublayers[decoded.key] = decoded
        return 0

    def _FwpmFilterAdd0(self, handle: int | None, structure: Any, sd: int | None, out: Any) -> int:
        self._session(handle)
        decoded = decode_filter(structure.contents)
        self.calls.append(("FwpmFilterAdd0", decoded))
        state = self._state
        boottime = bool(decoded.flags & s.FWPM_FILTER_FLAG_BOOTTIME)
        if boottime and _persistent(decoded.flags):
            raise _Failed(s.FWP_E_INVALID_FLAGS)
        dynamic = handle in self.dynamic
        if dynamic and (boottime or _persistent(decoded.flags)):
            raise _Failed(FWP_E_DYNAMIC_SESSION_IN_PROGRESS)
        if not decoded.name:
            raise _Failed(s.FWP_E_INVALID_PARAMETER)
        if decoded.layer not in LAYERS:
            raise _Failed(s.FWP_E_LAYER_NOT_FOUND)
        if decoded.sublayer not in state.sublayers:
            raise _Failed(s.FWP_E_SUBLAYER_NOT_FOUND)
        if decoded.provider is not None and decoded.provider not in state.providers:
            raise _Failed(s.FWP_E_PROVIDER_NOT_FOUND)
        if _persistent(decoded.flags) or boottime:
            referenced = [state.sublayers[decoded.sublayer].flags]
            if decoded.provider is not None:
                referenced.append(state.providers[decoded.provider].flags)
            if not all(_persistent(flags) for flags in referenced):
                raise _Failed(s.FWP_E_LIFETIME_MISMATCH)
        if decoded.weight_type == s.FWP_UINT8 and (decoded.weight or 0) > 15:
            raise _Failed(s.FWP_E_INVALID_WEIGHT)
        if decoded.action not in (s.FWP_ACTION_BLOCK, s.FWP_ACTION_PERMIT):
            raise _Failed(s.FWP_E_INVALID_PARAMETER)
        for condition in decoded.conditions:
            _check_condition(condition, decoded.layer)
        key = decoded.key if decoded.key.int else uuid.uuid4()
        if key in state.filters:
            raise _Failed(s.FWP_E_ALREADY_EXISTS)
        filter_id = next(self._ids)
        owner = handle if dynamic else None
        state.filters[key] = DecodedFilter(**{**decoded.__dict__, "key": key, "id": filter_id, "session": owner})
        # A boot-time filter added again replaces the record an earlier boot left.
        state.boot_records.pop(key, None)
        if out:
            out[0] = filter_id
        return 0

    def _FwpmFilterDeleteByKey0(self, handle: int | None, key: Any) -> int:
        self._session(handle)
        decoded = key.contents.to_uuid()
        self.calls.append(("FwpmFilterDeleteByKey0", decoded))
        if self._state.filters.pop(decoded, None) is None:
            raise _Failed(s.FWP_E_FILTER_NOT_FOUND)
        return 0

    def _FwpmSubLayerDeleteByKey0(self, handle: int | None, key: Any) -> int:
        self._session(handle)
        decoded = key.contents.to_uuid()
        self.calls.append(("FwpmSubLayerDeleteByKey0", decoded))
        state = self._state
        if decoded not in state.sublayers:
            raise _Failed(s.FWP_E_SUBLAYER_NOT_FOUND)
        if any(f.sublayer == decoded for f in state.filters.values()):
            raise _Failed(s.FWP_E_IN_USE)
        del state.sublayers[decoded]
        return 0

    def _FwpmProviderDeleteByKey0(self, handle: int | None, key: Any) -> int:
        self._session(handle)
        decoded = key.contents.to_uuid()
        self.calls.append(("FwpmProviderDeleteByKey0", decoded))
        state = self._state
        if decoded not in state.providers:
            raise _Failed(s.FWP_E_PROVIDER_NOT_FOUND)
        users: list[Sublayer | DecodedFilter] = [*state.sublayers.values(), *state.filters.values()]
        if any(u.provider == decoded for u in users):
            raise _Failed(s.FWP_E_IN_USE)
        del state.providers[decoded]
        return 0

    def _FwpmFilterCreateEnumHandle0(self, handle: int | None, template: Any, out: Any) -> int:
        self._session(handle)
        t = template.contents if template else None
        provider = _optional_uuid(t.providerKey) if t else None
        layer = _uuid(t.layerKey) if t else None
        flags = int(t.flags) if t else 0
        self.calls.append(("FwpmFilterCreateEnumHandle0", (provider, layer, flags)))
        if t is not None and (int(t.numFilterConditions) or t.providerContextTemplate or t.calloutKey):
            raise _Failed(s.FWP_E_INVALID_PARAMETER)  # the model only lists by provider and layer
        matching = [
            f
            for f in self._state.filters.values()
            if (layer is None or f.layer == layer)
            and (provider is None or f.provider == provider)
            and (flags & s.FWP_FILTER_ENUM_FLAG_INCLUDE_BOOTTIME or not f.flags & s.FWPM_FILTER_FLAG_BOOTTIME)
        ]
        enum = next(self._handles)
        self.enums[enum] = sorted(matching, key=lambda f: f.id)
        out[0] = enum
        return 0

    def _FwpmFilterEnum0(self, handle: int | None, enum: int | None, wanted: int, entries: Any, count: Any) -> int:
        self._session(handle)
        if enum not in self.enums:
            raise _Failed(ERROR_INVALID_HANDLE)
        batch, self.enums[enum] = self.enums[enum][:wanted], self.enums[enum][wanted:]
        self.calls.append(("FwpmFilterEnum0", len(batch)))
        structures = (s.FWPM_FILTER0 * max(len(batch), 1))()
        keep: list[object] = [structures]
        for structure, f in zip(structures, batch, strict=False):
            structure.filterKey = s.GUID.of(f.key)
            structure.layerKey = s.GUID.of(f.layer)
            structure.subLayerKey = s.GUID.of(f.sublayer)
            structure.flags = f.flags
            structure.filterId = f.id
            structure.displayData.name = f.name
            if f.provider is not None:
                guid = s.GUID.of(f.provider)
                keep.append(guid)
                structure.providerKey = ctypes.pointer(guid)
        pointers = (POINTER(s.FWPM_FILTER0) * max(len(batch), 1))()
        for i in range(len(batch)):
            pointers[i] = ctypes.pointer(structures[i])
        keep.append(pointers)
        self.allocations[ctypes.addressof(pointers)] = keep
        entries[0] = ctypes.cast(pointers, POINTER(POINTER(s.FWPM_FILTER0)))
        count[0] = len(batch)
        return 0

    def _FwpmFilterDestroyEnumHandle0(self, handle: int | None, enum: int | None) -> int:
        self._session(handle)
        self.calls.append(("FwpmFilterDestroyEnumHandle0", None))
        if self.enums.pop(enum or 0, None) is None:
            raise _Failed(ERROR_INVALID_HANDLE)
        return 0

    def _FwpmSubLayerCreateEnumHandle0(self, handle: int | None, template: Any, out: Any) -> int:
        self._session(handle)
        self.calls.append(("FwpmSubLayerCreateEnumHandle0", None))
        if template and template.contents.providerKey:
            raise _Failed(s.FWP_E_INVALID_PARAMETER)  # the model lists every sublayer only
        enum = next(self._handles)
        self.enums[enum] = sorted(self._state.sublayers.values(), key=lambda sl: str(sl.key))
        out[0] = enum
        return 0

    def _FwpmSubLayerEnum0(self, handle: int | None, enum: int | None, wanted: int, entries: Any, count: Any) -> int:
        self._session(handle)
        if enum not in self.enums:
            raise _Failed(ERROR_INVALID_HANDLE)
        batch, self.enums[enum] = self.enums[enum][:wanted], self.enums[enum][wanted:]
        self.calls.append(("FwpmSubLayerEnum0", len(batch)))
        structures = (s.FWPM_SUBLAYER0 * max(len(batch), 1))()
        keep: list[object] = [structures]
        for structure, sl in zip(structures, batch, strict=False):
            assert isinstance(sl, Sublayer)
            structure.subLayerKey = s.GUID.of(sl.key)
            structure.displayData.name = sl.name
            structure.flags = sl.flags
            structure.weight = sl.weight
        pointers = (POINTER(s.FWPM_SUBLAYER0) * max(len(batch), 1))()
        for i in range(len(batch)):
            pointers[i] = ctypes.pointer(structures[i])
        keep.append(pointers)
        self.allocations[ctypes.addressof(pointers)] = keep
        entries[0] = ctypes.cast(pointers, POINTER(POINTER(s.FWPM_SUBLAYER0)))
        count[0] = len(batch)
        return 0

    def _FwpmSubLayerDestroyEnumHandle0(self, handle: int | None, enum: int | None) -> int:
        self._session(handle)
        self.calls.append(("FwpmSubLayerDestroyEnumHandle0", None))
        if self.enums.pop(enum or 0, None) is None:
            raise _Failed(ERROR_INVALID_HANDLE)
        return 0

    def _FwpmFreeMemory0(self, pointer: Any) -> None:
        address = pointer[0] if pointer else None
        self.calls.append(("FwpmFreeMemory0", None))
        if address:
            if self.allocations.pop(address, None) is None:
                self.errors.append(ValueError(f"FwpmFreeMemory0 of unknown pointer {address:#x}"))
            pointer[0] = None

    def _FwpmGetAppIdFromFileName0(self, path: str | None, out: Any) -> int:
        self.calls.append(("FwpmGetAppIdFromFileName0", path))
        if path is None or not out:
            raise _Failed(ERROR_INVALID_PARAMETER)
        if path.lower() not in self.files:
            raise _Failed(ERROR_FILE_NOT_FOUND)
        data = app_id(path)
        buffer = ctypes.create_string_buffer(data, len(data))
        blob = s.FWP_BYTE_BLOB(len(data), ctypes.cast(buffer, POINTER(ctypes.c_uint8)))
        self.allocations[ctypes.addressof(blob)] = (blob, buffer)
        out[0] = ctypes.pointer(blob)
        return 0

    # -- iphlpapi.dll --------------------------------------------------------

    def _ConvertInterfaceAliasToLuid(self, alias: str | None, luid: Any) -> int:
        self.calls.append(("ConvertInterfaceAliasToLuid", alias))
        if alias not in self.aliases or not luid:
            return ERROR_INVALID_PARAMETER
        luid.contents.Value = self.aliases[alias]
        return 0

    def _GetIfEntry2(self, row: Any) -> int:
        r = row.contents
        luid = int(r.InterfaceLuid.Value)
        self.calls.append(("GetIfEntry2", luid))
        if luid not in self.aliases.values():
            return ERROR_FILE_NOT_FOUND
        adapter = self.adapters.get(luid, Adapter())
        r.Type = luid >> 48
        alias = next(a for a, value in self.aliases.items() if value == luid)
        for array, text in ((r.Alias, alias), (r.Description, adapter.description)):
            for i, char in enumerate(text[: s.IF_MAX_STRING_SIZE]):
                array[i] = ord(char)
            array[min(len(text), s.IF_MAX_STRING_SIZE)] = 0
        r.InterfaceAndOperStatusFlags = 1 if adapter.hardware else 0
        r.OperStatus = s.IF_OPER_STATUS_UP if adapter.up else 2
        return 0

    # -- advapi32.dll and kernel32.dll: file security ----------------------------

    def _allocate(self, data: bytes | str, out: Any) -> None:
        buffer = ctypes.create_unicode_buffer(data) if isinstance(data, str) else ctypes.create_string_buffer(data)
        self.local[ctypes.addressof(buffer)] = buffer
        out[0] = ctypes.addressof(buffer)

    def _sd_at(self, address: int | None) -> security.Descriptor:
        buffer = self.local.get(address or 0)
        if not isinstance(buffer, ctypes.Array) or isinstance(buffer[0], str):
            raise ValueError(f"{address!r} is no security descriptor this model handed out")
        return security.Descriptor.from_bytes(bytes(buffer))

    def _ConvertStringSecurityDescriptorToSecurityDescriptorW(
        self, text: str | None, revision: int, out: Any, size: Any
    ) -> int:
        self.calls.append(("ConvertStringSecurityDescriptorToSecurityDescriptorW", text))
        if revision != s.SDDL_REVISION_1 or text is None:
            return 0
        try:
            data = security.Descriptor.from_sddl(text).to_bytes()
        except security.SecurityError:
            return 0
        self._allocate(data, out)
        if size:
            size[0] = len(data)
        return 1

    def _ConvertSecurityDescriptorToStringSecurityDescriptorW(
        self, sd: int | None, revision: int, info: int, out: Any, size: Any
    ) -> int:
        self.calls.append(("ConvertSecurityDescriptorToStringSecurityDescriptorW", info))
        descriptor = self._sd_at(sd)
        if not info & s.OWNER_SECURITY_INFORMATION:
            descriptor = security.Descriptor(None, descriptor.aces, descriptor.protected)
        text = descriptor.to_sddl()
        self._allocate(text, out)
        if size:
            size[0] = len(text) + 1
        return 1

    def _SetFileSecurityW(self, path: str | None, info: int, sd: int | None) -> int:
        self.calls.append(("SetFileSecurityW", path))
        if path is None or not os.path.exists(path):
            return 0
        new, old = self._sd_at(sd), self.descriptor(path)
        owner = new.owner if info & s.OWNER_SECURITY_INFORMATION else old.owner
        if info & s.DACL_SECURITY_INFORMATION:
            # Only this object: SetFileSecurityW does not propagate to children.
            protected = new.protected or bool(info & s.PROTECTED_DACL_SECURITY_INFORMATION)
            self.security[path] = security.Descriptor(owner, new.aces, protected)
        else:
            self.security[path] = security.Descriptor(owner, old.aces, old.protected)
        return 1

    def _GetNamedSecurityInfoW(  # noqa: PLR0917 - the C prototype's arguments
        self, path: str | None, kind: int, info: int, owner: Any, group: Any, dacl: Any, sacl: Any, sd: Any
    ) -> int:
        self.calls.append(("GetNamedSecurityInfoW", path))
        if kind != s.SE_FILE_OBJECT or not sd or owner or group or dacl or sacl:
            return ERROR_INVALID_PARAMETER  # the model hands out the whole descriptor only
        if path is None or not os.path.exists(path):
            return ERROR_FILE_NOT_FOUND
        self._allocate(self.descriptor(path).to_bytes(), sd)
        return 0

    def _LocalFree(self, address: int | None) -> int | None:
        self.calls.append(("LocalFree", None))
        if address and self.local.pop(address, None) is None:
            self.errors.append(ValueError(f"LocalFree of unknown pointer {address:#x}"))
            return address
        return None
