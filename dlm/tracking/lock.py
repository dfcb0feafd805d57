"""One process per output folder: a lock file holding the owner's pid and host, so a second
`dlm train` on the same `output_dir` (or a second `dlm sweep` on one sweep) refuses in one line
instead of training into the same folders and MLflow runs.

The file is created with `O_CREAT | O_EXCL` (atomic on local and NFS v3+ filesystems). A lock left
by a process that died (SIGKILL, power loss) is stale: on the same host a pid that no longer runs is
taken over at once; a lock from another host cannot be checked from here, so the message names it
and the file to remove.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dlm.settings.errors import ConfigError

LOCK_FILE = ".dlm.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_lock(folder: str | Path) -> dict | None:
    """The lock's `{pid, host, started, what}`, or None when the folder is not locked (or the file
    is unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


def _stale(owner: dict | None) -> bool:
    if owner is None:
        return True  # half-written by a process killed between create and write
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))


def acquire(folder: str | Path, what: str) -> Path:
    """Create `<folder>/.dlm.lock` for this process, taking over a stale one; ConfigError if another
    owns it."""
    path = Path(folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "what": what}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_lock(folder)
            if (owner is not None and owner.get("pid") == os.getpid()
                    and owner.get("host") == me["host"]):
                raise ConfigError(f"{what}: {str(folder)!r} is already locked by this process")
            if not _stale(owner):
                raise ConfigError(f"{what}: {str(folder)!r} is in use by pid {owner['pid']} "
                                  f"on {owner['host']} (since {owner.get('started')}); "
                                  f"wait for it, or remove {path} "
                                  "if that process is gone") from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise ConfigError(f"{what}: could not lock {str(folder)!r} ({path} keeps reappearing)")


def release(folder: str | Path) -> None:
    """Remove the lock if this process owns it (never another process's)."""
    owner = read_lock(folder)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        (Path(folder) / LOCK_FILE).unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """`acquire` for the duration of a block; released on exit, also on an exception (not on
    SIGKILL: that leaves a stale lock, which the next process on this host takes over)."""
    path = acquire(folder, what)
    try:
        yield path
    finally:
        release(folder)
