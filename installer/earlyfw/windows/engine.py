"""The WFP transactions: install, relax, lock, uninstall.

Each runs in one BFE transaction (FwpmTransactionBegin0 … FwpmTransactionCommit0)
and aborts on the first unexpected error, so BFE holds either the old policy
or the new one, never a mix. The functions of fwpuclnt.dll and iphlpapi.dll
are reached through a `Backend`: the DLLs themselves on Windows
(`earlyfw.windows.backend`), or, in tests, a recording BFE model
(tests/wfp_model.py) that decodes every structure it is handed, which is how
the same code is tested on Linux.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from ctypes import POINTER, byref, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from earlyfw.config import Config
from earlyfw.errors import EarlyfwError
from earlyfw.windows import rules
from earlyfw.windows import structs as s
from earlyfw.windows.rules import Field, Filter, Interface, Layer, Lifetime, Program

R = TypeVar("R")

SESSION_NAME = "earlyfw"
# How long a transaction waits for another session's to finish.
TXN_WAIT_MS = 15_000
ENUM_BATCH = 64


class Backend(Protocol):
    """The C functions by name, each taking and returning ctypes values as
    the prototypes in `structs.PROTOTYPES` say."""

    @property
    def functions(self) -> Mapping[str, Callable[..., Any]]: ...


class WfpError(EarlyfwError):
    def __init__(self, call: str, code: int, *, hint: str | None = None) -> None:
        name = s.ERROR_NAMES.get(code, "error")
        super().__init__(f"{call} failed: {name} ({code:#010x})", hint=hint or _HINTS.get(code))
        self.call = call
        self.code = code


_HINTS = {
    s.FWP_E_SUBLAYER_NOT_FOUND: "earlyfw's WFP policy is not installed: run `earlyfw install` first",
    s.FWP_E_PROVIDER_NOT_FOUND: "earlyfw's WFP policy is not installed: run `earlyfw install` first",
    0x5: "WFP changes need an elevated (administrator) prompt",  # ERROR_ACCESS_DENIED
    0x6D9: "the Base Filtering Engine service (BFE) is not running: `sc start bfe`",  # EPT_S_NOT_REGISTERED
}


@dataclass(frozen=True)
class Found:
    """A filter of earlyfw's provider, as BFE enumerates it."""

    key: uuid.UUID
    id: int
    layer: Layer
    flags: int

    @property
    def lifetime(self) -> Lifetime:
        if self.flags & s.FWPM_FILTER_FLAG_BOOTTIME:
            return Lifetime.BOOTTIME
        return Lifetime.PERSISTENT if self.flags & s.FWPM_FILTER_FLAG_PERSISTENT else Lifetime.RUNTIME


class _Keep:
    """Holds the ctypes objects a structure points into until BFE has read it."""

    def __init__(self) -> None:
        self.objects: list[object] = []

    def __call__(self, obj: Any) -> Any:
        self.objects.append(obj)
        return obj


AppIds = Mapping[Program, bytes]


def _blob(data: bytes, keep: _Keep) -> Any:
    buffer = keep(ctypes.create_string_buffer(data, len(data)))
    return ctypes.pointer(keep(s.FWP_BYTE_BLOB(len(data), ctypes.cast(buffer, POINTER(ctypes.c_uint8)))))


def _condition(condition: rules.Condition, layer: Layer, keep: _Keep, app_ids: AppIds) -> s.FWPM_FILTER_CONDITION0:
    c = s.FWPM_FILTER_CONDITION0()
    c.fieldKey = s.GUID.of(condition.field.key)
    c.matchType = condition.field.match
    v = c.conditionValue
    value = condition.value
    match condition.field, value:
        case Field.PROTOCOL, int():
            v.type, v.uint8 = s.FWP_UINT8, value
        case Field.REMOTE_PORT | Field.LOCAL_PORT, int():
            v.type, v.uint16 = s.FWP_UINT16, value
        case Field.FLAGS, int():
            v.type, v.uint32 = s.FWP_UINT32, value
        case Field.LOCAL_INTERFACE | Field.FORWARD_INTERFACE | Field.ARRIVAL_INTERFACE, Interface():
            v.type, v.uint64 = s.FWP_UINT64, ctypes.pointer(keep(c_uint64(value.luid)))
        case Field.USER, rules.Owners():
            v.type, v.sd = s.FWP_SECURITY_DESCRIPTOR_TYPE, _blob(value.descriptor, keep)
        case Field.APP, Program() if value in app_ids:
            v.type, v.byteBlob = s.FWP_BYTE_BLOB_TYPE, _blob(app_ids[value], keep)
        case Field.REMOTE_ADDRESS, ipaddress.IPv4Address() if layer.version == 4:
            v.type, v.uint32 = s.FWP_UINT32, int(value)
        case Field.REMOTE_ADDRESS, ipaddress.IPv6Address() if layer.version == 6:
            array = keep(s.FWP_BYTE_ARRAY16.from_buffer_copy(value.packed))
            v.type, v.byteArray16 = s.FWP_BYTE_ARRAY16_TYPE, ctypes.pointer(array)
        case Field.REMOTE_ADDRESS, ipaddress.IPv4Network() if layer.version == 4:
            mask = keep(s.FWP_V4_ADDR_AND_MASK(int(value.network_address), int(value.netmask)))
            v.type, v.v4AddrMask = s.FWP_V4_ADDR_MASK, ctypes.pointer(mask)
        case Field.REMOTE_ADDRESS, ipaddress.IPv6Network() if layer.version == 6:
            mask6 = keep(s.FWP_V6_ADDR_AND_MASK())
            ctypes.memmove(mask6.addr, value.network_address.packed, 16)
            mask6.prefixLength = value.prefixlen
            v.type, v.v6AddrMask = s.FWP_V6_ADDR_MASK, ctypes.pointer(mask6)
        case _:
            raise ValueError(f"cannot encode {condition.field}={value!r} at {layer}")
    return c


def marshal_filter(spec: Filter, keep: _Keep, app_ids: AppIds) -> s.FWPM_FILTER0:
    f = s.FWPM_FILTER0()
    f.filterKey = s.GUID.of(spec.key)
    f.displayData.name = spec.name
    f.displayData.description = spec.description
    f.flags = spec.flags
    f.providerKey = ctypes.pointer(keep(s.GUID.of(s.PROVIDER_KEY)))
    f.layerKey = s.GUID.of(spec.layer.key)
    f.subLayerKey = s.GUID.of(s.SUBLAYER_KEY)
    f.weight.type = s.FWP_UINT8
    f.weight.uint8 = int(spec.weight)
    if spec.conditions:
        array = keep((s.FWPM_FILTER_CONDITION0 * len(spec.conditions))())
        for i, condition in enumerate(spec.conditions):
            array[i] = _condition(condition, spec.layer, keep, app_ids)
        f.numFilterConditions = len(spec.conditions)
        f.filterCondition = ctypes.cast(array, POINTER(s.FWPM_FILTER_CONDITION0))
    f.action.type = spec.action.code
    return f


def encode(filters: Iterable[Filter]) -> None:
    """Marshal each filter into the structures BFE is handed, as install and
    relax do, with no BFE: what `earlyfw verify` can check anywhere (an app
    ID, which only BFE derives, stands in as the path in UTF-16)."""
    filters = tuple(filters)
    stand_ins = {p: (p.path + "\0").encode("utf-16-le") for p in rules.programs(filters)}
    for spec in filters:
        try:
            marshal_filter(spec, _Keep(), stand_ins)
        except ValueError as e:  # a rules bug, never a user error
            raise EarlyfwError(f"WFP filter {spec.role!r} at {spec.layer}: {e}") from None


class Session:
    """One session with BFE. A plain one commits what outlives the process; a
    dynamic one (the watcher's) owns what it adds, and BFE deletes that when
    the session ends, also when its process is killed."""

    def __init__(self, backend: Backend, *, dynamic: bool = False) -> None:
        self.fn = backend.functions
        self.handle = c_void_p()
        self.dynamic = dynamic
        self.app_ids: dict[Program, bytes] = {}

    def call(self, name: str, *args: Any, ok: Iterable[int] = ()) -> int:
        code = int(self.fn[name](*args))
        if code and code not in set(ok):
            raise WfpError(name, code)
        return code

    def open(self) -> None:
        session = s.FWPM_SESSION0()
        session.displayData.name = SESSION_NAME
        session.displayData.description = "earlyfw boot-time kill switch"
        session.txnWaitTimeoutInMSec = TXN_WAIT_MS
        session.flags = s.FWPM_SESSION_FLAG_DYNAMIC if self.dynamic else 0
        self.call("FwpmEngineOpen0", None, s.RPC_C_AUTHN_WINNT, None, byref(session), byref(self.handle))

    def close(self) -> None:
        if self.handle:
            self.fn["FwpmEngineClose0"](self.handle)
            self.handle = c_void_p()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.call("FwpmTransactionBegin0", self.handle, 0)
        try:
            yield
            self.call("FwpmTransactionCommit0", self.handle)
        except BaseException:
            # The error that got us here is the one to report, not the abort's
            # (which fails harmlessly if a failed commit already ended it).
            self.fn["FwpmTransactionAbort0"](self.handle)
            raise

    def add_provider(self, *, exists_ok: bool = False) -> None:
        provider = s.FWPM_PROVIDER0()
        provider.providerKey = s.GUID.of(s.PROVIDER_KEY)
        provider.displayData.name = "earlyfw"
        provider.displayData.description = "earlyfw boot-time VPN kill switch"
        provider.flags = s.FWPM_PROVIDER_FLAG_PERSISTENT
        ok = [s.FWP_E_ALREADY_EXISTS] if exists_ok else []
        self.call("FwpmProviderAdd0", self.handle, byref(provider), None, ok=ok)

    def add_sublayer(self, *, exists_ok: bool = False) -> None:
        sublayer = s.FWPM_SUBLAYER0()
        sublayer.subLayerKey = s.GUID.of(s.SUBLAYER_KEY)
        sublayer.displayData.name = "earlyfw"
        sublayer.displayData.description = "earlyfw kill switch filters, evaluated before every other sublayer"
        sublayer.flags = s.FWPM_SUBLAYER_FLAG_PERSISTENT
        provider = s.GUID.of(s.PROVIDER_KEY)
        sublayer.providerKey = ctypes.pointer(provider)
        sublayer.weight = s.SUBLAYER_WEIGHT
        ok = [s.FWP_E_ALREADY_EXISTS] if exists_ok else []
        self.call("FwpmSubLayerAdd0", self.handle, byref(sublayer), None, ok=ok)

    def resolve(self, programs: Iterable[Program]) -> None:
        """Each program's app ID, before any change: a program that is not
        there fails the install, rather than a permit naming nothing (or one
        without the condition, open to every program)."""
        for program in programs:
            self.app_ids[program] = app_id(self.fn, program)

    def add_filter(self, spec: Filter) -> int:
        keep = _Keep()
        structure = marshal_filter(spec, keep, self.app_ids)
        filter_id = c_uint64()
        try:
            self.call("FwpmFilterAdd0", self.handle, byref(structure), None, byref(filter_id))
        except WfpError as e:
            raise WfpError(f"{e.call} ({spec.name}, {spec.layer})", e.code) from None
        return filter_id.value

    def delete_filter(self, key: uuid.UUID, *, missing_ok: bool = False) -> bool:
        ok = [s.FWP_E_FILTER_NOT_FOUND] if missing_ok else []
        return self.call("FwpmFilterDeleteByKey0", self.handle, byref(s.GUID.of(key)), ok=ok) == 0

    def delete_sublayer(self, *, missing_ok: bool = False) -> bool:
        ok = [s.FWP_E_SUBLAYER_NOT_FOUND] if missing_ok else []
        return self.call("FwpmSubLayerDeleteByKey0", self.handle, byref(s.GUID.of(s.SUBLAYER_KEY)), ok=ok) == 0

    def delete_provider(self, *, missing_ok: bool = False) -> bool:
        ok = [s.FWP_E_PROVIDER_NOT_FOUND] if missing_ok else []
        return self.call("FwpmProviderDeleteByKey0", self.handle, byref(s.GUID.of(s.PROVIDER_KEY)), ok=ok) == 0

    def sublayers(self) -> list[tuple[uuid.UUID, str, int]]:
        """Every sublayer BFE has: key, name, weight."""
        enum = c_void_p()
        self.call("FwpmSubLayerCreateEnumHandle0", self.handle, None, byref(enum))
        return self._drain(
            "FwpmSubLayer",
            s.FWPM_SUBLAYER0,
            enum,
            lambda sl: (sl.subLayerKey.to_uuid(), sl.displayData.name or "", int(sl.weight)),
        )

    def filters(self) -> list[Found]:
        """Every filter of earlyfw's provider, boot-time ones included."""
        found: list[Found] = []
        for layer in Layer:
            found += self._enumerate(layer)
        return found

    def _enumerate(self, layer: Layer) -> list[Found]:
        provider = s.GUID.of(s.PROVIDER_KEY)
        template = s.FWPM_FILTER_ENUM_TEMPLATE0()
        template.providerKey = ctypes.pointer(provider)
        template.layerKey = s.GUID.of(layer.key)
        template.enumType = s.FWP_FILTER_ENUM_OVERLAPPING  # with no conditions: every filter
        template.flags = s.FWP_FILTER_ENUM_FLAG_INCLUDE_BOOTTIME
        template.actionMask = 0xFFFFFFFF
        enum = c_void_p()
        self.call("FwpmFilterCreateEnumHandle0", self.handle, byref(template), byref(enum))
        return self._drain(
            "FwpmFilter",
            s.FWPM_FILTER0,
            enum,
            lambda f: Found(f.filterKey.to_uuid(), int(f.filterId), layer, int(f.flags)),
        )

    def _drain(self, api: str, struct: type[Any], enum: c_void_p, read: Callable[[Any], R]) -> list[R]:
        """Every entry of an open enumeration (`api` is the function family,
        FwpmFilter or FwpmSubLayer), batch by batch, each `read` before BFE's
        memory is freed (its strings live there); the handle is destroyed
        whatever happens."""
        found: list[R] = []
        try:
            while True:
                entries = POINTER(POINTER(struct))()
                count = c_uint32()
                self.call(f"{api}Enum0", self.handle, enum, ENUM_BATCH, byref(entries), byref(count))
                try:
                    found += [read(entries[i].contents) for i in range(count.value)]
                finally:
                    memory = ctypes.cast(entries, c_void_p)
                    self.fn["FwpmFreeMemory0"](byref(memory))
                if count.value < ENUM_BATCH:
                    return found
        finally:
            self.fn[f"{api}DestroyEnumHandle0"](self.handle, enum)


_MISSING = (s.ERROR_FILE_NOT_FOUND, s.ERROR_PATH_NOT_FOUND, s.HRESULT_FILE_NOT_FOUND, s.HRESULT_PATH_NOT_FOUND)


def app_id(fn: Mapping[str, Callable[..., Any]], program: Program) -> bytes:
    """FwpmGetAppIdFromFileName0: the app ID BFE compares ALE_APP_ID with
    (needs no session; BFE allocates it, FwpmFreeMemory0 releases it)."""
    blob = POINTER(s.FWP_BYTE_BLOB)()
    code = int(fn["FwpmGetAppIdFromFileName0"](program.path, byref(blob)))
    if code:
        what = "no such file" if code in _MISSING else f"{s.ERROR_NAMES.get(code, 'error')} ({code:#010x})"
        raise EarlyfwError(
            f"tunnel.program: {program.path!r}: {what}: the endpoint permits name the tunnel client by "
            "this file's app ID; nothing was changed",
            hint="install the tunnel client there, or set [tunnel] program to its executable's path",
        )
    try:
        return ctypes.string_at(blob.contents.data, blob.contents.size)
    finally:
        memory = ctypes.cast(blob, c_void_p)
        fn["FwpmFreeMemory0"](byref(memory))


@contextlib.contextmanager
def session(backend: Backend) -> Iterator[Session]:
    bfe = Session(backend)
    bfe.open()
    try:
        yield bfe
    finally:
        bfe.close()


def _remove_all(bfe: Session) -> None:
    """Delete every earlyfw filter: those BFE lists for the provider, and the
    fixed keys in case an older install left one outside it."""
    found = bfe.filters()
    for f in found:
        bfe.delete_filter(f.key)
    for key in sorted(rules.fixed_keys() - {f.key for f in found}):
        bfe.delete_filter(key, missing_ok=True)


def install(backend: Backend, config: Config) -> list[int]:
    """Put the blocked state in place, replacing whatever earlyfw had there,
    in one transaction. Returns the new filters' ids."""
    filters = rules.install_set(config)
    with session(backend) as bfe:
        bfe.resolve(rules.programs(filters))
        with bfe.transaction():
            _remove_all(bfe)
            bfe.delete_sublayer(missing_ok=True)
            bfe.delete_provider(missing_ok=True)
            bfe.add_provider()
            bfe.add_sublayer()
            return [bfe.add_filter(f) for f in filters]


def uninstall(backend: Backend) -> None:
    """Remove every earlyfw object, whatever state a partial install left.

    BFE only knows a boot-time filter as an object on the boot it was added;
    on a later boot its key may answer FWP_E_FILTER_NOT_FOUND while its
    boot-time record stays behind. Adding each fixed boot-time key again and
    deleting it in the same transaction clears that record either way.
    """
    with session(backend) as bfe, bfe.transaction():
        bfe.add_provider(exists_ok=True)
        bfe.add_sublayer(exists_ok=True)
        _remove_all(bfe)
        for f in rules.boottime_set():
            bfe.add_filter(f)
            bfe.delete_filter(f.key)
        bfe.delete_sublayer()
        bfe.delete_provider()


# Tunnel adapters by the interface type inside their LUID (bits 48-63):
# wintun, WireGuardNT and ovpn-dco are IF_TYPE_PROP_VIRTUAL, IP-in-IP and
# other tunnels IF_TYPE_TUNNEL.
TUNNEL_IF_TYPES = frozenset({s.IF_TYPE_PROP_VIRTUAL, s.IF_TYPE_TUNNEL})
# TAP-Windows6 presents itself as Ethernet: accepted only when GetIfEntry2
# says it is no hardware interface and its driver is the TAP driver.
VIRTUAL_ETHERNET_DRIVERS = ("TAP-Windows Adapter V9",)


def if_type(luid: int) -> int:
    return luid >> 48


def _row(backend: Backend, luid: int) -> s.MIB_IF_ROW2 | None:
    row = s.MIB_IF_ROW2()
    row.InterfaceLuid.Value = luid
    return row if backend.functions["GetIfEntry2"](byref(row)) == 0 else None


def tunnel_luid(backend: Backend, alias: str) -> int | None:
    """The tunnel adapter's LUID (iphlpapi; no BFE session needed), None if
    there is no such adapter. Refuses an adapter that is not a tunnel:
    permitting a physical NIC would be no kill switch at all."""
    luid = s.NET_LUID()
    if backend.functions["ConvertInterfaceAliasToLuid"](alias, byref(luid)) != 0:
        return None
    value = int(luid.Value)
    kind = if_type(value)
    if kind in TUNNEL_IF_TYPES:
        return value
    row = _row(backend, value)
    description = s.MIB_IF_ROW2.text(row.Description) if row is not None else ""
    hardware = row is None or bool(row.InterfaceAndOperStatusFlags & 1)
    if kind == s.IF_TYPE_ETHERNET_CSMACD and not hardware and description.startswith(VIRTUAL_ETHERNET_DRIVERS):
        return value
    raise EarlyfwError(
        f"[tunnel] interface {alias!r} is not a tunnel adapter (interface type {kind}"
        + (f", {description!r}" if description else "")
        + "): earlyfw relaxes only onto wintun, WireGuardNT, ovpn-dco or TAP-Windows adapters",
        hint="name the VPN's own adapter (Get-NetAdapter | Format-List Name,InterfaceDescription), never the NIC",
    )


def adapter_up(backend: Backend, luid: int) -> bool:
    """IF_OPER_STATUS straight from GetIfEntry2: no PowerShell, no localised text."""
    row = _row(backend, luid)
    return row is not None and row.OperStatus == s.IF_OPER_STATUS_UP


def relax_in(bfe: Session, config: Config, tunnel: Interface, *, unless: Callable[[], bool] = lambda: False) -> bool:
    """Permit the tunnel (replacing an earlier relax, e.g. for an adapter
    that came back with a new LUID) in one transaction of `bfe`. Fails,
    changing nothing, if earlyfw's policy is not installed. `unless` is
    asked once the transaction holds BFE; if true nothing changes (False)."""
    with bfe.transaction():
        if unless():
            return False
        for key in sorted(rules.relax_keys()):
            bfe.delete_filter(key, missing_ok=True)
        for f in rules.relax_set(config, tunnel):
            bfe.add_filter(f)
    return True


def lock_in(bfe: Session) -> None:
    with bfe.transaction():
        for key in sorted(rules.relax_keys()):
            bfe.delete_filter(key, missing_ok=True)


def relax(backend: Backend, config: Config, tunnel: Interface) -> None:
    """A relax by hand: runtime filters that outlive the command, until
    `lock`, a reboot or a BFE restart."""
    with session(backend) as bfe:
        relax_in(bfe, config, tunnel)


def lock(backend: Backend) -> None:
    with session(backend) as bfe:
        lock_in(bfe)


def relax_keys_in(bfe: Session) -> frozenset[uuid.UUID]:
    """Which relax permits BFE holds right now."""
    return frozenset(f.key for f in bfe.filters()) & rules.relax_keys()


def rival_sublayers(backend: Backend) -> list[tuple[uuid.UUID, str, int]]:
    """Other sublayers as heavy as earlyfw's: a hard permit in one of them
    is not overridden by earlyfw's blocks (`windows status` warns)."""
    with session(backend) as bfe:
        return [sl for sl in bfe.sublayers() if sl[2] >= s.SUBLAYER_WEIGHT and sl[0] != s.SUBLAYER_KEY]


def installed(backend: Backend) -> list[Found]:
    with session(backend) as bfe:
        return bfe.filters()
