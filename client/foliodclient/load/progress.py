"""The live progress line on a terminal: operations, rate, errors, elapsed and remaining time.

Drawn on stderr with a carriage return, at most every `every_seconds`; silent when the stream is
not a terminal (a pipe, a file, a test), so logs and --json output stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 20


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds + 0.5)
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def render(
    ops: int,
    errors: int,
    elapsed_seconds: float,
    remaining_seconds: float | None,
    *,
    warmup: bool = False,
) -> str:
    """One progress line: bar (when the remaining time is known), ops, rate, errors, times."""
    rate = ops / elapsed_seconds if elapsed_seconds > 0 else 0.0
    bar = ""
    if remaining_seconds is not None:
        total = elapsed_seconds + remaining_seconds
        filled = int(BAR_WIDTH * elapsed_seconds / total) if total > 0 else BAR_WIDTH
        bar = "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "] "
    phase = "warm-up " if warmup else ""
    return (
        f"{phase}{bar}{ops:,} ops  {rate:,.0f} ops/s  {errors:,} errors  "
        f"elapsed {_duration(elapsed_seconds)}  remaining {_duration(remaining_seconds)}"
    )


class Progress:
    """Redraws the progress line on `stream` when it is a terminal (or `enabled` says so)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        every_seconds: float = 0.2,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.every_seconds = every_seconds
        self._last_draw = -float("inf")
        self._width = 0

    def update(
        self,
        *,
        ops: int,
        errors: int,
        elapsed_seconds: float,
        remaining_seconds: float | None,
        warmup: bool = False,
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < self.every_seconds:
            return
        self._last_draw = now
        line = render(ops, errors, elapsed_seconds, remaining_seconds, warmup=warmup)
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self) -> None:
        """Ends the line, so what follows starts on a fresh one."""
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
