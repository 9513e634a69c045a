"""The backing store under the page cache: real files in one directory and a device time model
(mm/backing-dev.c and the block layer, reduced to what the page cache needs).

Names are validated before any path is built: relative, no empty, "." or ".." components, no NUL,
at most 255 bytes a component and 1024 in all; the resolved path must stay inside the store, so
nothing outside it can be touched (symbolic links included).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from foliod.mm.errors import InvalidArgument
from foliod.mm.page_alloc import PAGE_SIZE

MAX_NAME_BYTES = 1024
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


def check_file_name(name: str) -> str:
    """Returns the name if it is a valid relative file name; InvalidArgument otherwise."""
    encoded = name.encode("utf-8", "surrogatepass")
    problem = ""
    if not name:
        problem = "is empty"
    elif len(encoded) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif "\0" in name:
        problem = "contains NUL"
    elif name.startswith("/"):
        problem = "is absolute"
    else:
        for part in name.split("/"):
            if part in ("", ".", ".."):
                problem = f"has a {part!r} component" if part else "has an empty component"
                break
            if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
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

    def path(self, name: str) -> Path:
        """The path of a valid name, proven to lie inside the store."""
        path = self.root / check_file_name(name)
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise InvalidArgument(f"file name {name[:80]!r} leaves the store", field="name")
        return path

    def names(self) -> dict[str, int]:
        """Every file in the store with its size in bytes."""
        found = {}
        for dirpath, _, filenames in os.walk(self.root):
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

    def read_pages(self, name: str, index: int, nr_pages: int) -> bytes:
        """nr_pages pages from page index; bytes past the end of the file read as zeros."""
        length = nr_pages * PAGE_SIZE
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return bytes(length)
        try:
            data = os.pread(fd, length, index * PAGE_SIZE)
        finally:
            os.close(fd)
        return data.ljust(length, b"\0")

    def write(self, name: str, offset: int, data: bytes, size: int) -> None:
        """Writes data at a byte offset, the file's length kept at size bytes."""
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
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
