"""Running the build's commands: each one logged, each failure one readable
error that names the log to look at."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the chroot sees: the guest's own tools first, and no host locale.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
}


class HarnessError(Exception):
    """The proof could not be carried out (a tool is missing, a build failed);
    distinct from the proof failing, which is an assertion."""


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = {
            "qemu-system-x86_64": "qemu-system-x86",
            "mmdebstrap": "mmdebstrap",
            "mke2fs": "e2fsprogs",
            "unshare": "util-linux",
            "nft": "nftables",
        }
        names = sorted({packages.get(t, t) for t in missing})
        raise HarnessError(f"missing {', '.join(missing)}: apt-get install {' '.join(names)}")


def run(
    argv: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
) -> str:
    """Run argv; its output goes to `log` (appended) and is returned."""
    line = "+ " + shlex.join(argv)
    print(line, file=sys.stderr, flush=True)
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise HarnessError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{shlex.join(argv)}: timed out after {timeout} s") from None
    output = done.stdout.decode(errors="replace")
    if log is not None:
        with log.open("a") as f:
            f.write(line + "\n" + output)
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        where = f" (full log: {log})" if log else ""
        raise HarnessError(f"{shlex.join(argv)} failed with status {done.returncode}{where}\n{tail}")
    return output


def chroot(
    root: Path,
    argv: Sequence[str],
    *,
    log: Path | None = None,
    binds: Mapping[str, Path] | None = None,
    network: bool = True,
) -> str:
    """Run argv inside the guest tree with /proc, /dev and /sys mounted, in a
    private mount namespace so nothing stays mounted whatever happens.
    `binds`: host directories mounted at paths inside the tree (download
    caches). `network=False`: in a network namespace of its own, holding
    only loopback, for whatever may load a ruleset (maintainer scripts)."""
    mounts = "".join(
        f' && mount --bind {shlex.quote(str(source))} "$0"{shlex.quote(inside)}'
        for inside, source in (binds or {}).items()
    )
    script = (
        'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && mount --rbind /sys "$0/sys"'
        f'{mounts} && exec chroot "$0" "$@"'
    )
    private = ["--mount", "--propagation", "private", *(() if network else ("--net",))]
    return run(["unshare", *private, "--", "sh", "-c", script, str(root), *argv], log=log, env=CHROOT_ENV)
