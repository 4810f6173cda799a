"""The Windows target: the WFP policy, the watcher task, and the files they read.

The files (under C:\\ProgramData\\earlyfw) are the config, the filter set as
JSON, the scheduled task that runs the watcher, and a break-glass script. The
policy itself is not a file: on a live Windows host `after_install` puts it in
BFE in one WFP transaction (see earlyfw.wfp). On Linux the target is only ever
chosen by name, and then only to write an image's files under --root.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import ClassVar

from earlyfw import templates
from earlyfw.config import Config, TunnelKind
from earlyfw.errors import EarlyfwError
from earlyfw.root import Root, Transaction
from earlyfw.run import Runner
from earlyfw.targets import File, Plan, System, Target, write_artifacts
from earlyfw.wfp import backend, engine, rules
from earlyfw.wfp import structs as s

DATA_DIR = "/ProgramData/earlyfw"
CONFIG_PATH = f"{DATA_DIR}/earlyfw.toml"
FILTERS_PATH = f"{DATA_DIR}/wfp-filters.json"
TASK_PATH = f"{DATA_DIR}/earlyfw-watch.xml"
BREAKGLASS_PATH = f"{DATA_DIR}/earlyfw-breakglass.ps1"
# Program Files is writable by administrators only, so the SYSTEM task runs a
# binary no user can replace.
EXE_PATH = "/Program Files/earlyfw/earlyfw.exe"
TASK_NAME = "earlyfw-watch"

# Who may touch the data directory: SYSTEM and Administrators fully, Users read.
# Without this it would inherit ProgramData's ACL, under which any user may
# create files there, and the SYSTEM task reads its config from it.
DATA_DIR_ACL = ("*S-1-5-18:(OI)(CI)F", "*S-1-5-32-544:(OI)(CI)F", "*S-1-5-32-545:(OI)(CI)RX")


def on_windows() -> bool:
    return sys.platform == "win32"


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
    placeholder = rules.Interface(config.interface, 0)
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
        # The WFP functions; tests hand in earlyfw.wfp.recording's model.
        self.load_backend: Callable[[], engine.Backend] = backend.load

    @classmethod
    def detect(cls, root: Root) -> bool:
        return on_windows()

    def plan(self, config: Config) -> Plan:
        if self.root.is_host and not on_windows():
            # Refused here, while every target is still planning: nothing written.
            raise EarlyfwError(
                "the windows target puts filters into Windows' Base Filtering Engine; this is not Windows",
                hint="to prepare a Windows image's files from here: earlyfw install --target windows --root DIR",
            )
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
        if self.root.is_host and on_windows():
            exe = self.root / EXE_PATH
            if not exe.exists():
                raise EarlyfwError(
                    f"{exe} is missing: the watcher task runs it",
                    hint="copy earlyfw.exe there (see README, Windows) and run the install from it",
                )
            created: list[str] = []
            self.root.makedirs(DATA_DIR, created)
            txn.created_directories.extend(created)
            self._lock_down_data_dir()
        write_artifacts(plan.artifacts, txn)

    def _lock_down_data_dir(self) -> None:
        directory = str(self.root / DATA_DIR)
        self.runner.run(["icacls", directory, "/setowner", "*S-1-5-32-544", "/T", "/C", "/Q"])
        grants = [arg for ace in DATA_DIR_ACL for arg in ("/grant:r", ace)]
        self.runner.run(["icacls", directory, "/inheritance:r", *grants, "/T", "/C", "/Q"])

    def after_install(self, config: Config) -> None:
        # The block first: if anything after it fails, the host stays blocked.
        engine.install(self.load_backend(), config)
        self.runner.run(["schtasks", "/End", "/TN", TASK_NAME], check=False)
        if not watches(config):
            self.runner.run(["schtasks", "/Delete", "/TN", TASK_NAME, "/F"], check=False)
            return
        self.runner.run(["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(self.root / TASK_PATH), "/F"])
        self.runner.run(["schtasks", "/Run", "/TN", TASK_NAME])

    def after_uninstall(self) -> None:
        # Stop the watcher before the policy goes, so it cannot relax into it.
        self.runner.run(["schtasks", "/End", "/TN", TASK_NAME], check=False)
        self.runner.run(["schtasks", "/Delete", "/TN", TASK_NAME, "/F"], check=False)
        engine.uninstall(self.load_backend())
