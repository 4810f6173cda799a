"""The WFP structures, constants and prototypes, laid out as on Windows x64.

Field names are the C names, so tests/test_windows_layout.py can compile a
probe against the real mingw-w64 headers that checks every size and offset
here, and check the GUIDs against Microsoft's Win32 metadata. Nothing in this
module touches a DLL: it imports and is checked on any OS.
"""

from __future__ import annotations

import uuid
from ctypes import (
    POINTER,
    Structure,
    Union,
    c_double,
    c_float,
    c_int8,
    c_int16,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
    c_wchar_p,
)
from typing import Any


class GUID(Structure):
    _fields_ = [
        ("Data1", c_uint32),
        ("Data2", c_uint16),
        ("Data3", c_uint16),
        ("Data4", c_uint8 * 8),
    ]

    @classmethod
    def of(cls, value: uuid.UUID) -> GUID:
        # bytes_le is exactly the in-memory layout of a Windows GUID.
        return cls.from_buffer_copy(value.bytes_le)

    def to_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self))


class NET_LUID(Structure):
    # Bits 48-63 are the interface type (IFTYPE), so a LUID alone tells a
    # tunnel adapter from an Ethernet card (see rules.adapter_kind).
    _fields_ = [("Value", c_uint64)]


class ULONG(c_uint32):
    """ULONG/DWORD, 32 bits on Windows (ctypes' c_ulong is 64 on Linux). A
    type of its own so the layout probe spells pointers to it `ULONG*`."""


class FWP_BYTE_ARRAY6(Structure):
    _fields_ = [("byteArray6", c_uint8 * 6)]


class FWP_BYTE_ARRAY16(Structure):
    _fields_ = [("byteArray16", c_uint8 * 16)]


class FWP_BYTE_BLOB(Structure):
    _fields_ = [("size", c_uint32), ("data", POINTER(c_uint8))]


class FWP_V4_ADDR_AND_MASK(Structure):
    # Both in host byte order, as WFP compares IPv4 addresses as UINT32s.
    _fields_ = [("addr", c_uint32), ("mask", c_uint32)]


class FWP_V6_ADDR_AND_MASK(Structure):
    _fields_ = [("addr", c_uint8 * 16), ("prefixLength", c_uint8)]


_VALUE_MEMBERS: list[tuple[str, Any]] = [
    ("uint8", c_uint8),
    ("uint16", c_uint16),
    ("uint32", c_uint32),
    ("uint64", POINTER(c_uint64)),
    ("int8", c_int8),
    ("int16", c_int16),
    ("int32", c_int32),
    ("int64", POINTER(c_int64)),
    ("float32", c_float),
    ("double64", POINTER(c_double)),
    ("byteArray16", POINTER(FWP_BYTE_ARRAY16)),
    ("byteBlob", POINTER(FWP_BYTE_BLOB)),
    ("sid", c_void_p),
    ("sd", POINTER(FWP_BYTE_BLOB)),
    ("tokenInformation", c_void_p),
    ("tokenAccessInformation", POINTER(FWP_BYTE_BLOB)),
    ("unicodeString", c_wchar_p),
    ("byteArray6", POINTER(FWP_BYTE_ARRAY6)),
]


class _FWP_VALUE0_UNION(Union):
    _fields_ = _VALUE_MEMBERS


class FWP_VALUE0(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_int32), ("u", _FWP_VALUE0_UNION)]


class FWP_RANGE0(Structure):
    _fields_ = [("valueLow", FWP_VALUE0), ("valueHigh", FWP_VALUE0)]


class _FWP_CONDITION_VALUE0_UNION(Union):
    _fields_ = [
        *_VALUE_MEMBERS,
        ("v4AddrMask", POINTER(FWP_V4_ADDR_AND_MASK)),
        ("v6AddrMask", POINTER(FWP_V6_ADDR_AND_MASK)),
        ("rangeValue", POINTER(FWP_RANGE0)),
    ]


class FWP_CONDITION_VALUE0(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_int32), ("u", _FWP_CONDITION_VALUE0_UNION)]


class FWPM_DISPLAY_DATA0(Structure):
    _fields_ = [("name", c_wchar_p), ("description", c_wchar_p)]


class _FWPM_ACTION0_UNION(Union):
    _fields_ = [("filterType", GUID), ("calloutKey", GUID)]


class FWPM_ACTION0(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_uint32), ("u", _FWPM_ACTION0_UNION)]


class FWPM_FILTER_CONDITION0(Structure):
    _fields_ = [
        ("fieldKey", GUID),
        ("matchType", c_int32),
        ("conditionValue", FWP_CONDITION_VALUE0),
    ]


class _FWPM_FILTER0_UNION(Union):
    _fields_ = [("rawContext", c_uint64), ("providerContextKey", GUID)]


class FWPM_FILTER0(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("filterKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("providerKey", POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("layerKey", GUID),
        ("subLayerKey", GUID),
        ("weight", FWP_VALUE0),
        ("numFilterConditions", c_uint32),
        ("filterCondition", POINTER(FWPM_FILTER_CONDITION0)),
        ("action", FWPM_ACTION0),
        ("u", _FWPM_FILTER0_UNION),
        ("reserved", POINTER(GUID)),
        ("filterId", c_uint64),
        ("effectiveWeight", FWP_VALUE0),
    ]


class FWPM_PROVIDER0(Structure):
    _fields_ = [
        ("providerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("providerData", FWP_BYTE_BLOB),
        ("serviceName", c_wchar_p),
    ]


class FWPM_SUBLAYER0(Structure):
    _fields_ = [
        ("subLayerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        # UINT32 in the Windows SDK (mingw-w64 10 says UINT16; same offsets).
        ("flags", c_uint32),
        ("providerKey", POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("weight", c_uint16),
    ]


class FWPM_SESSION0(Structure):
    _fields_ = [
        ("sessionKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", c_uint32),
        ("txnWaitTimeoutInMSec", c_uint32),
        ("processId", c_uint32),
        ("sid", c_void_p),
        ("username", c_wchar_p),
        ("kernelMode", c_int32),
    ]


class FWPM_PROVIDER_CONTEXT_ENUM_TEMPLATE0(Structure):
    _fields_ = [("providerKey", POINTER(GUID)), ("providerContextType", c_int32)]


class FWPM_SUBLAYER_ENUM_TEMPLATE0(Structure):
    _fields_ = [("providerKey", POINTER(GUID))]


class FWPM_FILTER_ENUM_TEMPLATE0(Structure):
    _fields_ = [
        ("providerKey", POINTER(GUID)),
        ("layerKey", GUID),
        ("enumType", c_int32),
        ("flags", c_uint32),
        ("providerContextTemplate", POINTER(FWPM_PROVIDER_CONTEXT_ENUM_TEMPLATE0)),
        ("numFilterConditions", c_uint32),
        ("filterCondition", POINTER(FWPM_FILTER_CONDITION0)),
        ("actionMask", c_uint32),
        ("calloutKey", POINTER(GUID)),
    ]


class ACL(Structure):
    """The header of an access control list; only ever handled by pointer."""

    _fields_ = [
        ("AclRevision", c_uint8),
        ("Sbz1", c_uint8),
        ("AclSize", c_uint16),
        ("AceCount", c_uint16),
        ("Sbz2", c_uint16),
    ]


IF_MAX_STRING_SIZE = 256
IF_MAX_PHYS_ADDRESS_LENGTH = 32


_IF_COUNTERS = [
    "TransmitLinkSpeed",
    "ReceiveLinkSpeed",
    "InOctets",
    "InUcastPkts",
    "InNUcastPkts",
    "InDiscards",
    "InErrors",
    "InUnknownProtos",
    "InUcastOctets",
    "InMulticastOctets",
    "InBroadcastOctets",
    "OutOctets",
    "OutUcastPkts",
    "OutNUcastPkts",
    "OutDiscards",
    "OutErrors",
    "OutUcastOctets",
    "OutMulticastOctets",
    "OutBroadcastOctets",
    "OutQLen",
]


class MIB_IF_ROW2(Structure):
    """What GetIfEntry2 reports about one adapter (netioapi.h)."""

    _fields_ = [
        ("InterfaceLuid", NET_LUID),
        ("InterfaceIndex", c_uint32),
        ("InterfaceGuid", GUID),
        ("Alias", c_uint16 * (IF_MAX_STRING_SIZE + 1)),
        ("Description", c_uint16 * (IF_MAX_STRING_SIZE + 1)),
        ("PhysicalAddressLength", c_uint32),
        ("PhysicalAddress", c_uint8 * IF_MAX_PHYS_ADDRESS_LENGTH),
        ("PermanentPhysicalAddress", c_uint8 * IF_MAX_PHYS_ADDRESS_LENGTH),
        ("Mtu", c_uint32),
        ("Type", c_uint32),
        ("TunnelType", c_int32),
        ("MediaType", c_int32),
        ("PhysicalMediumType", c_int32),
        ("AccessType", c_int32),
        ("DirectionType", c_int32),
        # A byte of bit fields; bit 0 is HardwareInterface.
        ("InterfaceAndOperStatusFlags", c_uint8),
        ("OperStatus", c_int32),
        ("AdminStatus", c_int32),
        ("MediaConnectState", c_int32),
        ("NetworkGuid", GUID),
        ("ConnectionType", c_int32),
        *[(name, c_uint64) for name in _IF_COUNTERS],
    ]

    @staticmethod
    def text(array: Any) -> str:
        return "".join(map(chr, array)).split("\0", 1)[0]


# Every structure the probe checks, by its C typedef name.
STRUCTURES: tuple[type[Structure], ...] = (
    GUID,
    NET_LUID,
    FWP_BYTE_ARRAY6,
    FWP_BYTE_ARRAY16,
    FWP_BYTE_BLOB,
    FWP_V4_ADDR_AND_MASK,
    FWP_V6_ADDR_AND_MASK,
    FWP_VALUE0,
    FWP_RANGE0,
    FWP_CONDITION_VALUE0,
    FWPM_DISPLAY_DATA0,
    FWPM_ACTION0,
    FWPM_FILTER_CONDITION0,
    FWPM_FILTER0,
    FWPM_PROVIDER0,
    FWPM_SUBLAYER0,
    FWPM_SESSION0,
    FWPM_PROVIDER_CONTEXT_ENUM_TEMPLATE0,
    FWPM_FILTER_ENUM_TEMPLATE0,
    FWPM_SUBLAYER_ENUM_TEMPLATE0,
    MIB_IF_ROW2,
    ACL,
)

# FWP_DATA_TYPE (fwptypes.h)
FWP_EMPTY = 0
FWP_UINT8 = 1
FWP_UINT16 = 2
FWP_UINT32 = 3
FWP_UINT64 = 4
FWP_BYTE_ARRAY16_TYPE = 11
FWP_BYTE_BLOB_TYPE = 12
FWP_SECURITY_DESCRIPTOR_TYPE = 14
FWP_V4_ADDR_MASK = 0x100
FWP_V6_ADDR_MASK = 0x101

# FWP_MATCH_TYPE
FWP_MATCH_EQUAL = 0
FWP_MATCH_FLAGS_ALL_SET = 6

# FWP_ACTION_TYPE
FWP_ACTION_FLAG_TERMINATING = 0x1000
FWP_ACTION_BLOCK = 0x1 | FWP_ACTION_FLAG_TERMINATING
FWP_ACTION_PERMIT = 0x2 | FWP_ACTION_FLAG_TERMINATING

FWP_CONDITION_FLAG_IS_LOOPBACK = 0x1
# The access right an ALE_USER_ID security descriptor grants to the users
# whose sockets a filter matches.
FWP_ACTRL_MATCH_FILTER = 0x1

# A session whose objects BFE deletes when the session ends, also when its
# process dies (fwpmtypes.h).
FWPM_SESSION_FLAG_DYNAMIC = 0x1

# IFTYPE values (ipifcons.h) and IF_OPER_STATUS.
IF_TYPE_ETHERNET_CSMACD = 6
IF_TYPE_PPP = 23
IF_TYPE_SOFTWARE_LOOPBACK = 24
IF_TYPE_PROP_VIRTUAL = 53
IF_TYPE_IEEE80211 = 71
IF_TYPE_TUNNEL = 131
IF_OPER_STATUS_UP = 1

# FWP_FILTER_ENUM_TYPE and enumeration flags
FWP_FILTER_ENUM_OVERLAPPING = 1
FWP_FILTER_ENUM_FLAG_INCLUDE_BOOTTIME = 0x8

# Object flags. mingw-w64 10 lacks these; they are checked against Microsoft's
# Win32 metadata instead.
FWPM_FILTER_FLAG_PERSISTENT = 0x1
FWPM_FILTER_FLAG_BOOTTIME = 0x2
FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT = 0x8
FWPM_PROVIDER_FLAG_PERSISTENT = 0x1
FWPM_SUBLAYER_FLAG_PERSISTENT = 0x1

RPC_C_AUTHN_WINNT = 10

# The WFP errors earlyfw tells apart (winerror.h).
FWP_E_FILTER_NOT_FOUND = 0x80320003
FWP_E_LAYER_NOT_FOUND = 0x80320004
FWP_E_PROVIDER_NOT_FOUND = 0x80320005
FWP_E_SUBLAYER_NOT_FOUND = 0x80320007
FWP_E_NOT_FOUND = 0x80320008
FWP_E_ALREADY_EXISTS = 0x80320009
FWP_E_IN_USE = 0x8032000A
FWP_E_DYNAMIC_SESSION_IN_PROGRESS = 0x8032000B
FWP_E_NO_TXN_IN_PROGRESS = 0x8032000D
FWP_E_TXN_IN_PROGRESS = 0x8032000E
FWP_E_LIFETIME_MISMATCH = 0x80320016
FWP_E_INVALID_FLAGS = 0x8032001E
FWP_E_INVALID_WEIGHT = 0x80320025
FWP_E_TYPE_MISMATCH = 0x80320027
FWP_E_CONDITION_NOT_FOUND = 0x80320002
FWP_E_INVALID_PARAMETER = 0x80320035
ERROR_NOT_FOUND = 1168
# What FwpmGetAppIdFromFileName0 says of a missing file (a Win32 code, or the
# same as an HRESULT).
ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
HRESULT_FILE_NOT_FOUND = 0x80070002
HRESULT_PATH_NOT_FOUND = 0x80070003

ERROR_NAMES = {
    code: name
    for name, code in globals().items()
    if (name.startswith("FWP_E_") or name.startswith("ERROR_")) and isinstance(code, int)
}

# Layer and condition GUIDs (fwpmu.h in the Windows SDK).
FWPM_LAYER_ALE_AUTH_CONNECT_V4 = uuid.UUID("c38d57d1-05a7-4c33-904f-7fbceee60e82")
FWPM_LAYER_ALE_AUTH_CONNECT_V6 = uuid.UUID("4a72393b-319f-44bc-84c3-ba54dcb3b6b4")
FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4 = uuid.UUID("e1cd9fe7-f4b5-4273-96c0-592e487b8650")
FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6 = uuid.UUID("a3b42c97-9f04-4672-b87e-cee9c483257f")
FWPM_LAYER_IPFORWARD_V4 = uuid.UUID("a82acc24-4ee1-4ee1-b465-fd1d25cb10a4")
FWPM_LAYER_IPFORWARD_V6 = uuid.UUID("7b964818-19c7-493a-b71f-832c3684d28c")

FWPM_CONDITION_IP_REMOTE_ADDRESS = uuid.UUID("b235ae9a-1d64-49b8-a44c-5ff3d9095045")
FWPM_CONDITION_IP_LOCAL_INTERFACE = uuid.UUID("4cd62a49-59c3-4969-b7f3-bda5d32890a4")
FWPM_CONDITION_IP_PROTOCOL = uuid.UUID("3971ef2b-623e-4f9a-8cb1-6e79b806b9a7")
FWPM_CONDITION_IP_LOCAL_PORT = uuid.UUID("0c1ba1af-5765-453f-af22-a8f791ac775b")
FWPM_CONDITION_IP_REMOTE_PORT = uuid.UUID("c35a604d-d22b-4e1a-91b4-68f674ee674b")
FWPM_CONDITION_FLAGS = uuid.UUID("632ce23b-5167-435c-86d7-e903684aa80c")
FWPM_CONDITION_ALE_USER_ID = uuid.UUID("af043a0a-b34d-4f86-979c-c90371af6e66")
# The executable that opened the socket, as FwpmGetAppIdFromFileName0 names it.
FWPM_CONDITION_ALE_APP_ID = uuid.UUID("d78e1e87-8644-4ea5-9437-d809ecefc971")
FWPM_CONDITION_IP_FORWARD_INTERFACE = uuid.UUID("1076b8a5-6323-4c5e-9810-e8d3fc9e6136")
FWPM_CONDITION_IP_ARRIVAL_INTERFACE = uuid.UUID("618a9b6d-386b-4136-ad6e-b51587cfb1cd")
# At the ALE layers an ICMP packet's type travels in the local port field and
# its code in the remote port field (fwpmu.h: #define FWPM_CONDITION_ICMP_TYPE
# FWPM_CONDITION_IP_LOCAL_PORT).
FWPM_CONDITION_ICMP_TYPE = FWPM_CONDITION_IP_LOCAL_PORT

# earlyfw's own objects: fixed, so uninstall and break-glass find them exactly.
PROVIDER_KEY = uuid.UUID("d4e61f5f-1d35-4e05-acc2-7616d5802bf3")
SUBLAYER_KEY = uuid.UUID("ee6ed4b6-a5c2-437b-ac99-a44b381b4a70")
# Filter keys are uuid5 names under this namespace (see rules.filter_key).
FILTER_NAMESPACE = uuid.UUID("a2cfb38a-0ecf-476f-966d-3ab4659171d3")
# The highest sublayer weight. Mullvad and wireguard-windows use it too, so it
# does not put earlyfw before every other sublayer: BFE evaluates every
# sublayer, and a hard permit elsewhere is not overridden (status warns).
SUBLAYER_WEIGHT = 0xFFFF


PHANDLE = POINTER(c_void_p)

# The C prototypes of every function earlyfw calls, by DLL: (restype, argtypes).
# The real backend binds them from the DLL, the tests' BFE model wraps its
# Python callables in the same prototypes, and the probe test compiles a call
# to each against the mingw-w64 headers, so all three agree.
FWPUCLNT: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "FwpmEngineOpen0": (c_uint32, (c_wchar_p, c_uint32, c_void_p, POINTER(FWPM_SESSION0), PHANDLE)),
    "FwpmEngineClose0": (c_uint32, (c_void_p,)),
    "FwpmTransactionBegin0": (c_uint32, (c_void_p, c_uint32)),
    "FwpmTransactionCommit0": (c_uint32, (c_void_p,)),
    "FwpmTransactionAbort0": (c_uint32, (c_void_p,)),
    "FwpmProviderAdd0": (c_uint32, (c_void_p, POINTER(FWPM_PROVIDER0), c_void_p)),
    "FwpmProviderDeleteByKey0": (c_uint32, (c_void_p, POINTER(GUID))),
    "FwpmSubLayerAdd0": (c_uint32, (c_void_p, POINTER(FWPM_SUBLAYER0), c_void_p)),
    "FwpmSubLayerDeleteByKey0": (c_uint32, (c_void_p, POINTER(GUID))),
    "FwpmFilterAdd0": (c_uint32, (c_void_p, POINTER(FWPM_FILTER0), c_void_p, POINTER(c_uint64))),
    "FwpmFilterDeleteByKey0": (c_uint32, (c_void_p, POINTER(GUID))),
    "FwpmFilterCreateEnumHandle0": (c_uint32, (c_void_p, POINTER(FWPM_FILTER_ENUM_TEMPLATE0), PHANDLE)),
    "FwpmFilterEnum0": (
        c_uint32,
        (c_void_p, c_void_p, c_uint32, POINTER(POINTER(POINTER(FWPM_FILTER0))), POINTER(c_uint32)),
    ),
    "FwpmFilterDestroyEnumHandle0": (c_uint32, (c_void_p, c_void_p)),
    "FwpmSubLayerCreateEnumHandle0": (c_uint32, (c_void_p, POINTER(FWPM_SUBLAYER_ENUM_TEMPLATE0), PHANDLE)),
    "FwpmSubLayerEnum0": (
        c_uint32,
        (c_void_p, c_void_p, c_uint32, POINTER(POINTER(POINTER(FWPM_SUBLAYER0))), POINTER(c_uint32)),
    ),
    "FwpmSubLayerDestroyEnumHandle0": (c_uint32, (c_void_p, c_void_p)),
    "FwpmFreeMemory0": (None, (POINTER(c_void_p),)),
    "FwpmGetAppIdFromFileName0": (c_uint32, (c_wchar_p, POINTER(POINTER(FWP_BYTE_BLOB)))),
}
IPHLPAPI: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "ConvertInterfaceAliasToLuid": (c_uint32, (c_wchar_p, POINTER(NET_LUID))),
    "GetIfEntry2": (c_uint32, (POINTER(MIB_IF_ROW2),)),
}
# BOOL functions return c_int32 (signed); the SDDL ones allocate with LocalAlloc.
ADVAPI32: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "ConvertStringSecurityDescriptorToSecurityDescriptorW": (
        c_int32,
        (c_wchar_p, c_uint32, POINTER(c_void_p), POINTER(ULONG)),
    ),
    "ConvertSecurityDescriptorToStringSecurityDescriptorW": (
        c_int32,
        (c_void_p, c_uint32, c_uint32, POINTER(c_wchar_p), POINTER(ULONG)),
    ),
    "SetFileSecurityW": (c_int32, (c_wchar_p, c_uint32, c_void_p)),
    "GetNamedSecurityInfoW": (
        c_uint32,
        # name, type, what, owner, group, DACL, SACL, the whole descriptor
        (c_wchar_p, c_int32, c_uint32, *[POINTER(c_void_p)] * 2, *[POINTER(POINTER(ACL))] * 2, POINTER(c_void_p)),
    ),
}
KERNEL32: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "LocalFree": (c_void_p, (c_void_p,)),
}
PROTOTYPES = {"fwpuclnt": FWPUCLNT, "iphlpapi": IPHLPAPI, "advapi32": ADVAPI32, "kernel32": KERNEL32}

# SECURITY_INFORMATION bits and SE_OBJECT_TYPE (winnt.h, accctrl.h).
OWNER_SECURITY_INFORMATION = 0x1
DACL_SECURITY_INFORMATION = 0x4
PROTECTED_DACL_SECURITY_INFORMATION = 0x80000000
SE_FILE_OBJECT = 1
SDDL_REVISION_1 = 1
