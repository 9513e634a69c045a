"""The backing store under the page cache: real files in one directory and a device time model
(mm/backing-dev.c and the block layer, reduced to what the page cache needs).

Names are validated before any path is built: relative, no empty, "." or ".." components, no NUL,
at most 255 bytes a component and 1024 (UTF-8) in all. Every file is opened relative to directory
descriptors, one component at a time from the store's root, none followed if it is a symbolic
link (openat with O_NOFOLLOW, O_DIRECTORY for directories): nothing renamed or linked inside the
store can make foliod touch a file outside it. A new, renamed or removed name is made durable
by an fsync of its directory before the call that made it returns.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from foliod.api import DEVICE_PROFILES as DEVICE_PROFILES  # noqa: PLC0414 -- re-exported
from foliod.api import DeviceModel as DeviceModel  # noqa: PLC0414 -- re-exported
from foliod.mm.errors import InvalidArgument, UnsafeStorePath
from foliod.mm.page_alloc import PAGE_SIZE

MAX_NAME_BYTES = 1024
# Bounds on what the store keeps open or remembered between calls.
_MAX_OPEN_FILES = 256
# The store's own directory: per-file settings (max_order, ra_pages) that outlive a restart.
META_DIR = ".foliod"
_SETTINGS_FILE = "files.json"
_STAGED_SETTINGS_FILE = _SETTINGS_FILE + ".new"
_MAX_CACHED = 65_536
MAX_COMPONENT_BYTES = 255
# Rules a store holds at most: every write to the store walks them all.
MAX_FAULT_RULES = 64

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a component without following it fails with when a symbolic link stands there
# (ELOOP), or a file where a directory should be (ENOTDIR).
_UNSAFE_ERRNOS = frozenset((errno.ELOOP, errno.ENOTDIR))


FAULT_ERRNOS = {"": 0, "EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
MAX_FAULT_DELAY_SECONDS = 1.0


@dataclass(slots=True)
class FaultRule:
    """Makes matching writes to the backing store fail with errno_name, or only slow them.

    A write matches when it is to `name` (any file when empty) and overlaps [offset, offset +
    length) (to the end when length is 0); it then fails with the rule's probability, while
    `remaining` (None: unlimited) lasts. `delay_seconds` (at most 1 s) stalls every matching
    write, failing or not, for real: a slow disk.
    """

    errno_name: str = "EIO"
    name: str = ""
    offset: int = 0
    length: int = 0
    remaining: int | None = None
    probability: float = 1.0
    delay_seconds: float = 0.0
    injected: int = 0

    def __post_init__(self) -> None:
        if self.errno_name not in FAULT_ERRNOS:
            raise InvalidArgument(
                f"fault errno must be EIO, ENOSPC or empty (slow only), not {self.errno_name!r}",
                field="rules",
            )
        if self.name:
            check_file_name(self.name)
        if not 0.0 <= self.probability <= 1.0:
            raise InvalidArgument("fault probability must be 0..1", field="rules")
        if not 0.0 <= self.delay_seconds <= MAX_FAULT_DELAY_SECONDS:
            raise InvalidArgument("fault delay must be 0..1 s", field="rules")
        if self.remaining is not None and self.remaining < 0:
            raise InvalidArgument("fault count must not be negative", field="rules")

    def matches(self, name: str, offset: int, length: int) -> bool:
        if self.name and self.name != name:
            return False
        if self.remaining == 0:
            return False
        end = self.offset + self.length if self.length else None
        return offset + max(length, 1) > self.offset and (end is None or offset < end)


@dataclass
class FaultInjector:
    """The fault rules of one store and the seeded generator their probabilities draw from."""

    rules: list[FaultRule] = field(default_factory=list)
    seed: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def set(self, rules: list[FaultRule], seed: int) -> None:
        check_fault_rules(len(rules))
        self.rules = rules
        self.seed = seed
        self.rng = random.Random(seed)

    def check_write(self, name: str, offset: int, length: int) -> None:
        """Raises OSError for a write a rule fails; sleeps for a slow rule."""
        for rule in self.rules:
            if not rule.matches(name, offset, length):
                continue
            if rule.delay_seconds:
                time.sleep(rule.delay_seconds)
            errno_value = FAULT_ERRNOS[rule.errno_name]
            if errno_value and (rule.probability >= 1.0 or self.rng.random() < rule.probability):
                rule.injected += 1
                if rule.remaining is not None:
                    rule.remaining -= 1
                raise OSError(errno_value, f"injected {rule.errno_name} writing {name!r}")


def check_fault_rules(count: int) -> None:
    """InvalidArgument if a store would hold more than MAX_FAULT_RULES fault rules."""
    if count > MAX_FAULT_RULES:
        raise InvalidArgument(
            f"a store holds at most {MAX_FAULT_RULES} fault rules (MAX_FAULT_RULES), not {count}",
            field="rules",
        )


def check_file_name(name: str) -> str:
    """Returns the name if it is a valid relative file name; InvalidArgument otherwise."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("file name is not valid UTF-8", field="name") from None
    problem = ""
    if not name:
        problem = "is empty"
    elif len(encoded) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif "\0" in name:
        problem = "contains NUL"
    elif name.startswith("/"):
        problem = "is absolute"
    elif name.split("/", 1)[0] == META_DIR:
        problem = f"starts with {META_DIR!r}, which foliod keeps for itself"
    else:
        for part in name.split("/"):
            if part in ("", ".", ".."):
                problem = f"has a {part!r} component" if part else "has an empty component"
                break
            if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
                problem = f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
                break
    if problem:
        raise InvalidArgument(f"file name {name[:80]!r} {problem}", field="name")
    return name


def _unsafe(name: str, exc: OSError) -> UnsafeStorePath:
    return UnsafeStorePath(
        f"file name {name[:80]!r}: its path in the backing store holds a symbolic link, or a "
        "file where a directory should be (changed since foliod made it); foliod follows no "
        "symbolic link in its store",
        field="name",
        metadata={"name": name, "errno": errno.errorcode.get(exc.errno or 0, "")},
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class BackingStore:
    """Files of one machine under one directory.

    Calls that touch the store directly (create, truncate, read_pages, set_settings) raise
    UnsafeStorePath when a component of a name's path is a symbolic link, or a file where a
    directory should be; write and fsync, which writeback runs, raise the OSError (ELOOP,
    ENOTDIR) that the page cache records as a writeback error; delete then finds nothing of the
    name inside the store and removes nothing.
    """

    def __init__(self, root: Path, device: DeviceModel) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.device = device
        self.faults = FaultInjector()
        # Names already checked, as their components; read descriptors kept open.
        self._parts: dict[str, tuple[str, ...]] = {}
        self._read_fds: dict[str, int] = {}
        self._root_fd: int | None = None
        self._settings: dict[str, dict[str, int]] | None = None

    def _root(self) -> int:
        """A descriptor of the store's directory, opened once (again after close())."""
        fd = self._root_fd
        if fd is None:
            fd = self._root_fd = os.open(self.root, _DIR_FLAGS)
        return fd

    def _split(self, name: str) -> tuple[str, ...]:
        """The components of a valid name."""
        parts = self._parts.get(name)
        if parts is None:
            parts = tuple(check_file_name(name).split("/"))
            if len(self._parts) >= _MAX_CACHED:
                self._parts.clear()
            self._parts[name] = parts
        return parts

    @contextmanager
    def _directory(self, dirs: Sequence[str], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the directory `dirs` (components under the root), each opened
        relative to the one before and none followed if it is a symbolic link; with create,
        a missing one is made and its parent fsynced. Raises OSError: ENOENT for a missing
        directory, ELOOP or ENOTDIR for a symbolic link or a non-directory in the way."""
        fd = self._root()
        try:
            for part in dirs:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass  # made meanwhile; the open below checks what it is
                    else:
                        os.fsync(fd)  # the new directory's name
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != self._root_fd:
                    os.close(fd)
                fd = child
            yield fd
        finally:
            if fd != self._root_fd:
                os.close(fd)

    def _open(self, name: str, flags: int) -> int:
        """The file opened with flags through _directory; OSError if absent or unsafe."""
        *dirs, leaf = self._split(name)
        with self._directory(dirs) as parent:
            return os.open(leaf, flags | _FILE_FLAGS, dir_fd=parent)

    def _open_for_write(self, name: str) -> int:
        """The file opened for writing; made, with any missing directory, if absent (each new
        name fsynced in its directory)."""
        *dirs, leaf = self._split(name)
        with self._directory(dirs, create=True) as parent:
            try:
                return os.open(leaf, os.O_WRONLY | _FILE_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                pass
            try:
                fd = os.open(
                    leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644, dir_fd=parent
                )
            except FileExistsError:  # made meanwhile
                return os.open(leaf, os.O_WRONLY | _FILE_FLAGS, dir_fd=parent)
            os.fsync(parent)  # the new file's name
            return fd

    def _read_fd(self, name: str) -> int | None:
        """A descriptor open for reading the file, kept for the next read; None if absent."""
        fd = self._read_fds.get(name)
        if fd is None:
            try:
                fd = self._open(name, os.O_RDONLY)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno in _UNSAFE_ERRNOS:
                    raise _unsafe(name, exc) from exc
                raise
            if len(self._read_fds) >= _MAX_OPEN_FILES:
                self._forget(next(iter(self._read_fds)))
            self._read_fds[name] = fd
        return fd

    def _forget(self, name: str) -> None:
        fd = self._read_fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Closes the descriptors kept open (the store opens them again if used)."""
        for name in list(self._read_fds):
            self._forget(name)
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def names(self) -> dict[str, int]:
        """Every regular file in the store with its size in bytes (symbolic links are not
        files of the store, nor followed)."""
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root) and META_DIR in dirnames:
                dirnames.remove(META_DIR)
            for filename in filenames:
                full = Path(dirpath) / filename
                info = full.lstat()
                if stat.S_ISREG(info.st_mode):
                    found[full.relative_to(self.root).as_posix()] = info.st_size
        return found

    def create(self, name: str) -> None:
        """Makes the file (empty) if absent, with its directories; its name is durable."""
        try:
            fd = self._open_for_write(name)
        except OSError as exc:
            if exc.errno in _UNSAFE_ERRNOS:
                raise _unsafe(name, exc) from exc
            raise
        os.close(fd)

    def settings(self) -> dict[str, dict[str, int]]:
        """Per-file settings saved by set_settings; an unreadable record counts as none."""
        if self._settings is None:
            self._settings = self._load_settings()
        return self._settings

    def _load_settings(self) -> dict[str, dict[str, int]]:
        try:
            with self._directory((META_DIR,)) as meta:
                fd = os.open(_SETTINGS_FILE, os.O_RDONLY | _FILE_FLAGS, dir_fd=meta)
            with open(fd, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict):
            return {}
        return {
            name: {k: v for k, v in values.items() if isinstance(v, int)}
            for name, values in record.items()
            if isinstance(name, str) and isinstance(values, dict)
        }

    def set_settings(self, name: str, values: dict[str, int] | None) -> None:
        """Saves (or with None forgets) a file's settings. The record is replaced atomically
        and durably: the new one written and fsynced, renamed over the old, its directory
        fsynced. UnsafeStorePath if the store's own directory is a symbolic link, except when
        forgetting (a file being deleted): that record is not foliod's to edit any more."""
        record = dict(self.settings())
        if values:
            record[name] = values
        elif record.pop(name, None) is None:
            return
        text = json.dumps(record, sort_keys=True).encode("utf-8")
        try:
            with self._directory((META_DIR,), create=True) as meta:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS
                fd = os.open(_STAGED_SETTINGS_FILE, flags, 0o644, dir_fd=meta)
                try:
                    _write_all(fd, text)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(_STAGED_SETTINGS_FILE, _SETTINGS_FILE, src_dir_fd=meta, dst_dir_fd=meta)
                os.fsync(meta)
        except OSError as exc:
            if exc.errno not in _UNSAFE_ERRNOS:
                raise
            if values:
                raise _unsafe(f"{META_DIR}/{_SETTINGS_FILE}", exc) from exc
        self._settings = record

    def read_pages(self, name: str, index: int, nr_pages: int) -> bytes:
        """nr_pages pages from page index; bytes past the end of the file read as zeros."""
        length = nr_pages * PAGE_SIZE
        fd = self._read_fd(name)
        if fd is None:
            return bytes(length)
        return os.pread(fd, length, index * PAGE_SIZE).ljust(length, b"\0")

    def write(self, name: str, offset: int, data: bytes, size: int) -> None:
        """Writes data at a byte offset, the file's length kept at size bytes."""
        self.faults.check_write(name, offset, len(data))
        fd = self._open_for_write(name)
        try:
            end = min(offset + len(data), size)
            if end > offset:
                written = os.pwrite(fd, data[: end - offset], offset)
                if written != end - offset:
                    raise OSError(errno.EIO, "short write")
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def fsync(self, name: str) -> None:
        fd = self._open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, name: str, size: int) -> None:
        try:
            fd = self._open(name, os.O_WRONLY)
        except OSError as exc:
            if exc.errno in _UNSAFE_ERRNOS:
                raise _unsafe(name, exc) from exc
            raise
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        """Removes the file and the directories it leaves empty, each removal fsynced in its
        directory. A name whose path in the store is missing, or blocked by a symbolic link or
        a file, has nothing inside the store to remove: nothing is removed."""
        self._forget(name)
        *dirs, leaf = self._split(name)
        root = self._root()
        fds: list[int] = []  # fds[i]: the directory dirs[: i + 1]
        try:
            parent = root
            for part in dirs:
                try:
                    parent = os.open(part, _DIR_FLAGS, dir_fd=parent)
                except OSError as exc:
                    if exc.errno == errno.ENOENT or exc.errno in _UNSAFE_ERRNOS:
                        return
                    raise
                fds.append(parent)
            try:
                os.unlink(leaf, dir_fd=parent)
            except FileNotFoundError:
                return
            os.fsync(parent)
            for depth in range(len(dirs), 0, -1):
                if os.listdir(fds[depth - 1]):
                    break
                above = fds[depth - 2] if depth >= 2 else root
                try:
                    os.rmdir(dirs[depth - 1], dir_fd=above)
                except OSError:
                    break  # not empty any more, or not that directory
                os.fsync(above)
        finally:
            for fd in fds:
                os.close(fd)
