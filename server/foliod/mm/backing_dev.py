"""The backing store under the page cache: real files in one directory and a device time model
(mm/backing-dev.c and the block layer, reduced to what the page cache needs).

Names are validated before any path is built: relative, no empty, "." or ".." components, no NUL,
at most 255 bytes a component and 1024 in all; the resolved path must stay inside the store, so
nothing outside it can be touched (symbolic links included).
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from foliod.mm.errors import InvalidArgument
from foliod.mm.page_alloc import PAGE_SIZE

MAX_NAME_BYTES = 1024
# Bounds on what the store keeps open or remembered between calls.
_MAX_OPEN_FILES = 256
# The store's own directory: per-file settings (max_order, ra_pages) that outlive a restart.
META_DIR = ".foliod"
_SETTINGS_FILE = "files.json"
_MAX_CACHED = 65_536
MAX_COMPONENT_BYTES = 255


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """Per-request latency and bandwidth of the simulated device."""

    name: str
    read_latency_s: float
    write_latency_s: float
    read_bytes_per_s: float
    write_bytes_per_s: float

    def read_seconds(self, nr_bytes: int) -> float:
        return self.read_latency_s + nr_bytes / self.read_bytes_per_s

    def write_seconds(self, nr_bytes: int) -> float:
        return self.write_latency_s + nr_bytes / self.write_bytes_per_s


# A datacenter NVMe SSD and a 7200 rpm disk; figures are typical datasheet values [estimate].
DEVICE_PROFILES = {
    "nvme": DeviceModel("nvme", 80e-6, 20e-6, 3.0e9, 2.0e9),
    "hdd": DeviceModel("hdd", 8e-3, 8e-3, 180e6, 160e6),
}


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


class BackingStore:
    """Files of one machine under one directory."""

    def __init__(self, root: Path, device: DeviceModel) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.device = device
        self.faults = FaultInjector()
        # Names already proven to lie inside the store, and read descriptors kept open.
        self._paths: dict[str, Path] = {}
        self._read_fds: dict[str, int] = {}
        self._settings: dict[str, dict[str, int]] | None = None

    def path(self, name: str) -> Path:
        """The path of a valid name, proven to lie inside the store."""
        path = self._paths.get(name)
        if path is not None:
            return path
        path = self.root / check_file_name(name)
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise InvalidArgument(f"file name {name[:80]!r} leaves the store", field="name")
        if len(self._paths) >= _MAX_CACHED:
            self._paths.clear()
        self._paths[name] = path
        return path

    def __read_fd(self, name: str) -> int | None:
        """A descriptor open for reading the file, kept for the next read; None if absent."""
        fd = self._read_fds.get(name)
        if fd is None:
            try:
                fd = os.open(self.path(name), os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                return None
            if len(self._read_fds) >= _MAX_OPEN_FILES:
                self.__forget(next(iter(self._read_fds)))
            self._read_fds[name] = fd
        return fd

    def __forget(self, name: str) -> None:
        fd = self._read_fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Closes the descriptors kept open for reading."""
        for name in list(self._read_fds):
            self.__forget(name)

    def names(self) -> dict[str, int]:
        """Every file in the store with its size in bytes."""
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root) and META_DIR in dirnames:
                dirnames.remove(META_DIR)
            for filename in filenames:
                full = Path(dirpath) / filename
                if full.is_symlink():
                    continue
                found[full.relative_to(self.root).as_posix()] = full.stat().st_size
        return found

    def create(self, name: str) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def settings(self) -> dict[str, dict[str, int]]:
        """Per-file settings saved by set_settings; an unreadable record counts as none."""
        if self._settings is None:
            self._settings = self.__load_settings()
        return self._settings

    def __load_settings(self) -> dict[str, dict[str, int]]:
        try:
            with open(self.root / META_DIR / _SETTINGS_FILE, encoding="utf-8") as f:
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
        """Saves (or with None forgets) a file's settings; the record is replaced atomically."""
        record = dict(self.settings())
        if values:
            record[name] = values
        elif record.pop(name, None) is None:
            return
        meta = self.root / META_DIR
        meta.mkdir(exist_ok=True)
        staged = meta / (_SETTINGS_FILE + ".new")
        staged.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        os.replace(staged, meta / _SETTINGS_FILE)
        self._settings = record

    def read_pages(self, name: str, index: int, nr_pages: int) -> bytes:
        """nr_pages pages from page index; bytes past the end of the file read as zeros."""
        length = nr_pages * PAGE_SIZE
        fd = self.__read_fd(name)
        if fd is None:
            return bytes(length)
        return os.pread(fd, length, index * PAGE_SIZE).ljust(length, b"\0")

    def write(self, name: str, offset: int, data: bytes, size: int) -> None:
        """Writes data at a byte offset, the file's length kept at size bytes."""
        self.faults.check_write(name, offset, len(data))
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
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
        fd = os.open(self.path(name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, name: str, size: int) -> None:
        os.truncate(self.path(name), size)

    def delete(self, name: str) -> None:
        path = self.path(name)
        self.__forget(name)
        self._paths.pop(name, None)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
