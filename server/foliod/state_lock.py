"""One server per state directory: an exclusive flock(2) on <state_dir>/.lock for as long as
the server runs. Two servers on one directory would both rewrite files.json and the backing
files under each other (one of them failing with FileNotFoundError mid-rename). The lock goes
with the process, so a server killed with SIGKILL leaves nothing to clean up; the file keeps
the holder's pid for the error message."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class StateDirInUse(RuntimeError):
    """Another process holds the state directory."""


class StateDirLock:
    """Held from construction until release()."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirInUse(
                f"state directory {state_dir} is in use by another foliod (pid {holder}); "
                "give each server its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1
