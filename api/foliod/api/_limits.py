"""The page size, the limits a request must keep to, the default address, and sizes as text."""

from __future__ import annotations

import re

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
# Bytes one ReadFile or WriteFile call (or batch operation) may move.
MAX_IO_BYTES = 2 << 20
# Operations one Submit batch may hold, and the bytes its writes may carry together.
MAX_BATCH_OPS = 4096
MAX_BATCH_PAYLOAD_BYTES = 2 << 20
# Page accesses one Replay call may carry: bounds what a call holds (about 8 bytes an access
# while it is parsed, as page keys in lists) and how long it holds the machine.
MAX_REPLAY_ACCESSES = 16 << 20
# Where foliod listens and its clients connect unless told otherwise.
DEFAULT_ADDRESS = "127.0.0.1:50051"

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes from "4GiB", "512M" (binary), "1GB" (decimal) or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.fullmatch(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4GiB, 512MiB, 1TiB, 4096)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]
