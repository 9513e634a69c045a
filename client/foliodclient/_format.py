"""Text formatting shared by foliodctl and foliod-load: IEC sizes and aligned tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def iec(nr_bytes: int) -> str:
    """A size in IEC units: 512 B, 4 KiB, 1.53 MiB."""
    value = float(nr_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns right-aligned except the first, two spaces apart."""
    cells = [list(header), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
