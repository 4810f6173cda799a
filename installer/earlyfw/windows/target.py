"""The Windows target: the WFP policy, the watcher task, and the files they read.

The files (under C:\\ProgramData\\earlyfw) are the config, the filter set as
JSON, the scheduled task that runs the watcher, and a break-glass script. The
policy itself is not a file: on a live Windows host `after_install` puts it in
BFE in one WFP transaction (see earlyfw.windows). On Linux the target is only ever
chosen by name, and then only to write an image's files under --root.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Callable, Iterator
from ctypes import byref, c_void_p, c_wchar_p
from pathlib import PurePosixPath
from typing import ClassVar

from earlyfw import templates
from earlyfw.config import Config, TunnelKind
from earlyfw.errors import EarlyfwError
from earlyfw.root import Root, Transaction
from earlyfw.run import Runner
from earlyfw.system import System
from earlyfw.targets import File, Plan, Target, write_artifacts
from earlyfw.windows import backend, engine, rules, security
from earlyfw.windows import structs as s

CONFIG_PATH = System.WINDOWS.config_path
DATA_DIR = str(PurePosixPath(CONFIG_PATH).parent)
FILTERS_PATH = f"{DATA_DIR}/wfp-filters.json"
TASK_PATH = f"{DATA_DIR}/earlyfw-watch.xml"
BREAKGLASS_PATH = f"{DATA_DIR}/earlyfw-breakglass.ps1"
# Program Files is writable by administrators only, so the SYSTEM task runs a
# binary no user can replace.
EXE_PATH = "/Program Files/earlyfw/earlyfw.exe"
TASK_NAME = "earlyfw-watch"

# Who may touch the data directory and each file in it: owned by
# Administrators, SYSTEM and Administrators fully, Users read, and protected
# (P) from inheritance. Set whole, never merged: the README had users create
# the directory and config first, so a user may own them or hold an explicit
# entry there that icacls /grant:r would have kept, and the SYSTEM task trusts
# the config it reads from here.
DATA_DIR_SDDL = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1200a9;;;BU)"
DATA_FILE_SDDL = "O:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;0x1200a9;;;BU)"
_SECURITY_INFO = s.OWNER_SECURITY_INFORMATION | s.DACL_SECURITY_INFORMATION | s.PROTECTED_DACL_SECURITY_INFORMATION


def schtasks() -> str:
    """By its System32 path: an elevated install must not run whatever
    schtasks.exe comes first on PATH or in the working directory."""
    return os.path.join(os.environ.get("SYSTEMROOT", r"C:\Windows"), "System32", "schtasks.exe")


def windows_path(system_path: str) -> str:
    """How a user finds a system path on the usual system drive."""
    return "C:" + system_path.replace("/", "\\")


def _windows_text(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def watches(config: Config) -> bool:
    """Manual tunnels are relaxed and locked by hand: no watcher for them."""
    return config.tunnel_kind is not TunnelKind.MANUAL


def task_xml(config: Config) -> bytes:
    xml = templates.render(
        "payload/windows/earlyfw-watch.xml.j2",
        config=config,
        task_name=TASK_NAME,
        command="%ProgramFiles%\\earlyfw\\earlyfw.exe",
        # The watch command reads %ProgramData%\\earlyfw\\earlyfw.toml itself.
        arguments="windows watch",
    )
    # Task Scheduler reads task XML as UTF-16, as it exports it.
    return b"\xff\xfe" + xml.replace("\n", "\r\n").encode("utf-16-le")


def breakglass_script(config: Config) -> bytes:
    placeholder = rules.Interface(config.windows_adapter, 0)
    blocking = [
        f for f in (*rules.install_set(config), *rules.relax_set(config, placeholder)) if f.action is rules.Action.BLOCK
    ]
    script = templates.render(
        "payload/windows/earlyfw-breakglass.ps1.j2",
        authn=s.RPC_C_AUTHN_WINNT,
        block_keys=[str(f.key) for f in blocking],
        not_found=s.FWP_E_FILTER_NOT_FOUND,
        not_found_hex=f"{s.FWP_E_FILTER_NOT_FOUND:#010x}",
        sublayer=s.SUBLAYER_KEY,
        provider=s.PROVIDER_KEY,
    )
    return _windows_text(script)


class Windows(Target):
    name: ClassVar[str] = "windows"
    system: ClassVar[System] = System.WINDOWS
    order: ClassVar[int] = 60

    def __init__(self, root: Root, runner: Runner) -> None:
        super().__init__(root, runner)
        # The WFP functions; tests hand in their BFE model (tests/wfp_model.py).
        self.load_backend: Callable[[], engine.Backend] = backend.load

    @classmethod
    def detect(cls, root: Root) -> bool:
        return System.WINDOWS.is_current

    def plan(self, config: Config) -> Plan:
        rules.refuse_unsupported(config)
        if self.root.is_host and not System.WINDOWS.is_current:
            # Refused here, while every target is still planning: nothing written.
            raise EarlyfwError(
                "the windows target puts filters into Windows' Base Filtering Engine; this is not Windows",
                hint="to prepare a Windows image's files from here: earlyfw install --target windows --root DIR",
            )
        if self.root.is_host:
            # Refused before anything is written: an adapter that exists now
            # must be a tunnel (tunnel_luid raises for a NIC); one that does
            # not exist yet is checked again at every relax.
            engine.tunnel_luid(self.load_backend(), config.windows_adapter)
        files = [
            File(CONFIG_PATH, _windows_text(config.to_toml()), 0o644),
            File(FILTERS_PATH, _windows_text(json.dumps(rules.describe(config), indent=2) + "\n"), 0o644),
            File(BREAKGLASS_PATH, breakglass_script(config), 0o644),
        ]
        if watches(config):
            files.append(File(TASK_PATH, task_xml(config), 0o644))
        notes = (
            f"copy earlyfw.exe to {windows_path(EXE_PATH)} in the image",
            "on the image's first boot, run `earlyfw.exe install` elevated: the WFP filters live in BFE's store, "
            "which only a running Windows can write; until then that boot is not protected",
        )
        return Plan(self.name, tuple(files), image_notes=notes)

    def apply(self, plan: Plan, txn: Transaction) -> None:
        if self.root.is_host and System.WINDOWS.is_current:
            exe = self.root / EXE_PATH
            if not exe.exists():
                raise EarlyfwError(
                    f"{exe} is missing: the watcher task runs it",
                    hint="copy earlyfw.exe there (see README, Windows) and run the install from it",
                )
            created: list[str] = []
            self.root.makedirs(DATA_DIR, created)
            txn.created_directories.extend(created)
            # Before writing, so no file is ever created under a DACL a user
            # controls; after_install sets and verifies every file too.
            self._lock_down([str(self.root / DATA_DIR)])
        write_artifacts(plan.artifacts, txn)

    def _data_paths(self) -> Iterator[str]:
        top = str(self.root / DATA_DIR)
        yield top
        for directory, dirs, files in os.walk(top):
            for name in sorted(dirs) + sorted(files):
                yield os.path.join(directory, name)

    def _lock_down(self, paths: list[str]) -> None:
        """SetFileSecurityW on each path: it sets exactly that object's owner
        and protected DACL (SetNamedSecurityInfo would merge inherited ones)."""
        fn = self.load_backend().functions
        for kind, sddl in (("directory", DATA_DIR_SDDL), ("file", DATA_FILE_SDDL)):
            targets = [p for p in paths if os.path.isdir(p) == (kind == "directory")]
            if not targets:
                continue
            sd = c_void_p()
            if not fn["ConvertStringSecurityDescriptorToSecurityDescriptorW"](sddl, s.SDDL_REVISION_1, byref(sd), None):
                raise EarlyfwError(f"cannot build the security descriptor {sddl}")
            try:
                for path in targets:
                    if not fn["SetFileSecurityW"](path, _SECURITY_INFO, sd):
                        raise EarlyfwError(
                            f"cannot restrict {path} to SYSTEM and Administrators",
                            hint="run the install from an elevated prompt",
                        )
            finally:
                fn["LocalFree"](sd)

    def _descriptor(self, path: str) -> security.Descriptor:
        fn = self.load_backend().functions
        sd, text = c_void_p(), c_wchar_p()
        info = s.OWNER_SECURITY_INFORMATION | s.DACL_SECURITY_INFORMATION
        code = fn["GetNamedSecurityInfoW"](path, s.SE_FILE_OBJECT, info, None, None, None, None, byref(sd))
        if code != 0:
            raise EarlyfwError(f"cannot read the security of {path}: error {code}")
        try:
            if not fn["ConvertSecurityDescriptorToStringSecurityDescriptorW"](
                sd, s.SDDL_REVISION_1, info, byref(text), None
            ):
                raise EarlyfwError(f"cannot read the security of {path}")
            value = text.value or ""
            fn["LocalFree"](ctypes.cast(text, c_void_p))
        finally:
            fn["LocalFree"](sd)
        return security.Descriptor.from_sddl(value)

    def secure_data(self) -> None:
        """Lock down the directory and every file in it, then read each back:
        the watcher runs as SYSTEM on what is here, so anything a standard
        user could still change is refused."""
        paths = list(self._data_paths())
        self._lock_down(paths)
        for path in paths:
            problems = security.admin_only_problems(self._descriptor(path))
            if problems:
                raise EarlyfwError(
                    f"{path} is still not SYSTEM's and Administrators' alone: " + "; ".join(problems),
                    hint=f"icacls {windows_path(DATA_DIR)} /reset /T, then run the install again",
                )

    def after_install(self, config: Config) -> None:
        # The block first: if anything after it fails, the host stays blocked.
        engine.install(self.load_backend(), config)
        # Then nothing a standard user can write, before the SYSTEM task trusts it.
        self.secure_data()
        self.runner.run([schtasks(), "/End", "/TN", TASK_NAME], check=False)
        if not watches(config):
            self.runner.run([schtasks(), "/Delete", "/TN", TASK_NAME, "/F"], check=False)
            return
        self.runner.run([schtasks(), "/Create", "/TN", TASK_NAME, "/XML", str(self.root / TASK_PATH), "/F"])
        self.runner.run([schtasks(), "/Run", "/TN", TASK_NAME])

    def before_uninstall(self) -> None:
        """Before any file goes: if the WFP transaction fails, the manifest,
        the config and the break-glass script are all still there, and a
        second `earlyfw uninstall` can finish the job."""
        # Stop the watcher before the policy goes, so it cannot relax into it.
        self.runner.run([schtasks(), "/End", "/TN", TASK_NAME], check=False)
        self.runner.run([schtasks(), "/Delete", "/TN", TASK_NAME, "/F"], check=False)
        engine.uninstall(self.load_backend())
