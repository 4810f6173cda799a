"""The one seam through which earlyfw runs external commands.

Every command is logged as `+ argv` before it runs, so a user sees exactly what
touched their kernel. Tests hand in a Runner whose `_execute` and `_stream`
record instead of run (tests/recording_runner.py) to see the same list.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from earlyfw.errors import CommandError

if TYPE_CHECKING:
    from plumbum.machines import LocalCommand


def _command(name: str) -> LocalCommand:
    # plumbum is imported on the first command run, not with this module: the
    # watcher holds a Runner from its start but runs commands only when
    # libnftables fails it (or for `wg show`).
    from plumbum import local  # noqa: PLC0415
    from plumbum.commands.processes import CommandNotFound  # noqa: PLC0415

    try:
        return local[name]
    except CommandNotFound:
        raise CommandError(f"{name}: command not found", hint="install it and try again") from None


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs commands for real."""

    def __init__(self, *, verbose: bool = True) -> None:
        self.verbose = verbose

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True, stream: bool = False) -> Result:
        """`stream`: show the command's output as it runs (on stderr) instead of
        capturing it, for slow commands such as an initramfs rebuild."""
        if self.verbose:
            print("+ " + shlex.join(argv), file=sys.stderr)
        result = self._stream(argv) if stream else self._execute(argv, input)
        if check and result.returncode != 0:
            detail = result.stderr.strip().splitlines()
            raise CommandError(
                f"{shlex.join(argv)} failed with status {result.returncode}" + (f": {detail[0]}" if detail else ""),
                hint="\n".join(detail[1:]) or None,
            )
        return result

    def _execute(self, argv: Sequence[str], input: str | None) -> Result:
        command = _command(argv[0])
        bound = command[list(argv[1:])]
        runnable = bound if input is None else bound << input
        code, out, err = runnable.run(retcode=None)
        return Result(code, out, err)

    def _stream(self, argv: Sequence[str]) -> Result:
        command = _command(argv[0])
        sys.stderr.flush()
        # Straight to file descriptor 2, whatever Python-level stderr is.
        process = command[list(argv[1:])].popen(stdin=None, stdout=2, stderr=2)
        return Result(process.wait(), "", "")
