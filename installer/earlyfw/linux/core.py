"""The core target: the config and one ruleset per state under /etc/earlyfw.
Every other Linux target loads these files; none renders its own policy. It
comes with every Linux install (macOS and Windows write their own config)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import ClassVar

from earlyfw import policy
from earlyfw.config import Config
from earlyfw.linux import nft
from earlyfw.root import Root
from earlyfw.system import System
from earlyfw.targets import File, Plan, Target

CONFIG_PATH = System.LINUX.config_path
CONFIG_DIR = str(PurePosixPath(CONFIG_PATH).parent)


def ruleset_path(state: policy.State) -> str:
    return f"{CONFIG_DIR}/{state.ruleset_name}"


class Core(Target):
    name: ClassVar[str] = "core"
    system: ClassVar[System] = System.LINUX
    order: ClassVar[int] = 0

    @classmethod
    def detect(cls, root: Root) -> bool:
        return True

    def plan(self, config: Config) -> Plan:
        files = [File(CONFIG_PATH, config.to_toml().encode(), 0o644)]
        files += [File(ruleset_path(state), policy.render(config, state).encode(), 0o644) for state in policy.State]
        return Plan(self.name, tuple(files))

    def after_uninstall(self) -> None:
        # Nobody is locked out: with earlyfw gone, so is its table.
        nft.delete_tables(self.runner)
