"""Windows security identifiers and descriptors, in pure Python.

WFP matches a socket's owner (FWPM_CONDITION_ALE_USER_ID) against a
self-relative security descriptor passed as bytes, and earlyfw's data
directory must carry a protected DACL no standard user can change. Both are
written here from the documented binary layout (MS-DTYP 2.4.2, 2.4.5, 2.4.6)
and the SDDL grammar, so they are built and checked the same way on any OS.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from earlyfw.windows.structs import FWP_ACTRL_MATCH_FILTER

SYSTEM = "S-1-5-18"
ADMINISTRATORS = "S-1-5-32-544"
USERS = "S-1-5-32-545"
# SDDL's two-letter names for the SIDs earlyfw writes or must recognise.
ALIASES = {"SY": SYSTEM, "BA": ADMINISTRATORS, "BU": USERS, "WD": "S-1-1-0", "AU": "S-1-5-11", "CO": "S-1-3-0"}

ACCESS_ALLOWED_ACE_TYPE = 0
SE_DACL_PRESENT = 0x0004
SE_DACL_PROTECTED = 0x1000
SE_SELF_RELATIVE = 0x8000

FILE_ALL_ACCESS = 0x1F01FF
# Rights that let a holder change a file or directory, its DACL or owner.
WRITE_RIGHTS = 0x0002 | 0x0004 | 0x0010 | 0x0040 | 0x0100 | 0x10000 | 0x40000 | 0x80000 | 0x10000000 | 0x40000000
_SDDL_RIGHTS = {
    "FA": FILE_ALL_ACCESS,
    "FR": 0x120089,
    "FW": 0x120116,
    "FX": 0x1200A0,
    "GA": 0x10000000,
    "GR": 0x80000000,
    "GW": 0x40000000,
    "GX": 0x20000000,
}
_SDDL_FLAGS = {"OI": 0x1, "CI": 0x2, "NP": 0x4, "IO": 0x8, "ID": 0x10}

_SID = re.compile(r"S-1-(\d+)((?:-\d+)*)")


class SecurityError(ValueError):
    pass


def sid_bytes(sid: str) -> bytes:
    match = _SID.fullmatch(sid)
    if match is None:
        raise SecurityError(f"{sid!r} is not a SID")
    subs = [int(part) for part in match[2].split("-")[1:]]
    if len(subs) > 15 or any(s > 0xFFFFFFFF for s in subs):
        raise SecurityError(f"{sid!r} is not a SID")
    return bytes([1, len(subs)]) + int(match[1]).to_bytes(6, "big") + b"".join(struct.pack("<I", s) for s in subs)


def sid_from(data: bytes, offset: int = 0) -> tuple[str, int]:
    """The SID at offset, and its length in bytes."""
    if len(data) < offset + 8 or data[offset] != 1:
        raise SecurityError("truncated or unknown SID")
    count = data[offset + 1]
    end = offset + 8 + 4 * count
    if count > 15 or len(data) < end:
        raise SecurityError("truncated SID")
    authority = int.from_bytes(data[offset + 2 : offset + 8], "big")
    subs = struct.unpack_from(f"<{count}I", data, offset + 8)
    return "-".join(["S-1", str(authority), *map(str, subs)]), end - offset


def service_sid(name: str) -> str:
    """NT SERVICE\\<name>: S-1-5-80 and the SHA-1 of the upper-cased service
    name in UTF-16LE as five little-endian words (how `sc showsid` derives it)."""
    digest = hashlib.sha1(name.upper().encode("utf-16-le")).digest()  # noqa: S324 - Windows' derivation
    return "S-1-5-80-" + "-".join(str(w) for w in struct.unpack("<5I", digest))


@dataclass(frozen=True)
class Ace:
    sid: str
    mask: int
    flags: int = 0
    allow: bool = True


@dataclass(frozen=True)
class Descriptor:
    owner: str | None
    aces: tuple[Ace, ...]
    protected: bool = False

    def to_bytes(self) -> bytes:
        """Self-relative: header, owner, DACL (no group, no SACL)."""
        aces = b""
        for ace in self.aces:
            sid = sid_bytes(ace.sid)
            kind = ACCESS_ALLOWED_ACE_TYPE if ace.allow else 1
            aces += struct.pack("<BBHI", kind, ace.flags, 8 + len(sid), ace.mask) + sid
        acl = struct.pack("<BBHHH", 2, 0, 8 + len(aces), len(self.aces), 0) + aces
        owner = sid_bytes(self.owner) if self.owner else b""
        control = SE_SELF_RELATIVE | SE_DACL_PRESENT | (SE_DACL_PROTECTED if self.protected else 0)
        owner_at = 20 if owner else 0
        dacl_at = 20 + len(owner)
        return struct.pack("<BBHIIII", 1, 0, control, owner_at, 0, 0, dacl_at) + owner + acl

    @classmethod
    def from_bytes(cls, data: bytes) -> Descriptor:
        if len(data) < 20:
            raise SecurityError("truncated security descriptor")
        revision, _, control, owner_at, _group_at, _sacl_at, dacl_at = struct.unpack_from("<BBHIIII", data)
        if revision != 1 or not control & SE_SELF_RELATIVE or not control & SE_DACL_PRESENT or not dacl_at:
            raise SecurityError("not a self-relative security descriptor with a DACL")
        owner = sid_from(data, owner_at)[0] if owner_at else None
        _rev, _, size, count, _ = struct.unpack_from("<BBHHH", data, dacl_at)
        aces, at = [], dacl_at + 8
        for _ in range(count):
            kind, flags, ace_size, mask = struct.unpack_from("<BBHI", data, at)
            if kind not in (0, 1):
                raise SecurityError(f"ACE type {kind} is not allow or deny")
            aces.append(Ace(sid_from(data, at + 8)[0], mask, flags, kind == 0))
            at += ace_size
        if at > dacl_at + size:
            raise SecurityError("ACEs run past the ACL")
        return cls(owner, tuple(aces), bool(control & SE_DACL_PROTECTED))

    def to_sddl(self) -> str:
        dacl = "".join(f"({'A' if a.allow else 'D'};{_sddl_flags(a.flags)};{a.mask:#x};;;{a.sid})" for a in self.aces)
        owner = f"O:{self.owner}" if self.owner else ""
        return f"{owner}D:{'P' if self.protected else ''}{dacl}"

    @classmethod
    def from_sddl(cls, text: str) -> Descriptor:
        """The subset earlyfw writes and Windows reads back: O:, D: with the
        P and AI flags, allow and deny ACEs by SID or SDDL alias."""
        match = re.fullmatch(
            r"(?:O:([A-Z]{2}|S-1-[0-9-]+))?(?:G:(?:[A-Z]{2}|S-1-[0-9-]+))?D:([A-Z]*)((?:\([^)]*\))*)", text
        )
        if match is None:
            raise SecurityError(f"unsupported SDDL {text!r}")
        aces = []
        for body in re.findall(r"\(([^)]*)\)", match[3]):
            parts = body.split(";")
            if len(parts) != 6 or parts[0] not in ("A", "D"):
                raise SecurityError(f"unsupported ACE ({body})")
            flags = 0
            for i in range(0, len(parts[1]), 2):
                flags |= _SDDL_FLAGS[parts[1][i : i + 2]]
            aces.append(Ace(_sid(parts[5]), _rights(parts[2]), flags, parts[0] == "A"))
        owner = _sid(match[1]) if match[1] else None
        return cls(owner, tuple(aces), "P" in match[2])


def _sid(text: str) -> str:
    sid = ALIASES.get(text, text)
    sid_bytes(sid)
    return sid


def _rights(text: str) -> int:
    if text.startswith("0x"):
        return int(text, 16)
    mask = 0
    for i in range(0, len(text), 2):
        right = text[i : i + 2]
        if right not in _SDDL_RIGHTS:
            raise SecurityError(f"unsupported access right {right!r}")
        mask |= _SDDL_RIGHTS[right]
    return mask


def _sddl_flags(flags: int) -> str:
    return "".join(name for name, bit in _SDDL_FLAGS.items() if flags & bit)


def match_only(*sids: str) -> bytes:
    """The ALE_USER_ID descriptor matching sockets owned by these SIDs."""
    return Descriptor(SYSTEM, tuple(Ace(sid, FWP_ACTRL_MATCH_FILTER) for sid in sids)).to_bytes()


def admin_only_problems(descriptor: Descriptor) -> list[str]:
    """Why a file or directory a SYSTEM process trusts is not safe: its
    owner is not SYSTEM or Administrators, its DACL inherits, or it lets
    anyone else write."""
    trusted = (SYSTEM, ADMINISTRATORS)
    problems = []
    if descriptor.owner not in trusted:
        problems.append(f"owner {descriptor.owner}")
    if not descriptor.protected:
        problems.append("DACL not protected from inheritance")
    for ace in descriptor.aces:
        if ace.allow and ace.sid not in trusted and ace.mask & WRITE_RIGHTS:
            problems.append(f"{ace.sid} may write ({ace.mask:#x})")
    return problems
