"""foliodctl's exit codes: the one table its docstring, its --help and the docs render.

foliod-load and foliod-load mrc exit with these codes for a failed call too. tests/test_cli.py
checks the table in the docs is render_markdown()'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 8


@dataclass(frozen=True, slots=True)
class ExitCode:
    """An exit code, what it means, the status codes of a failed call that exit with it, and
    what else does (its text follows the status names as written)."""

    code: int
    meaning: str
    statuses: tuple[grpc.StatusCode, ...] = ()
    also: str = ""

    @property
    def source(self) -> str:
        return ", ".join(status.name for status in self.statuses) + self.also


_S = grpc.StatusCode
EXIT_CODE_TABLE = (
    ExitCode(EXIT_OK, "success"),
    ExitCode(
        EXIT_FAILURE,
        "any other failure",
        (_S.INTERNAL, _S.UNKNOWN, _S.UNIMPLEMENTED, _S.CANCELLED),
        "; a local file unreadable",
    ),
    ExitCode(EXIT_USAGE, "usage: the command line is wrong", also="argparse"),
    ExitCode(3, "invalid argument", (_S.INVALID_ARGUMENT, _S.OUT_OF_RANGE)),
    ExitCode(4, "not found", (_S.NOT_FOUND,)),
    ExitCode(5, "state conflict", (_S.ALREADY_EXISTS, _S.FAILED_PRECONDITION, _S.ABORTED)),
    ExitCode(6, "out of memory", (_S.RESOURCE_EXHAUSTED,)),
    ExitCode(7, "data loss", (_S.DATA_LOSS,), " (fsync found a writeback error)"),
    ExitCode(
        EXIT_UNAVAILABLE,
        "server unavailable or not serving",
        (_S.UNAVAILABLE,),
        "; `health` not SERVING",
    ),
    ExitCode(9, "timed out", (_S.DEADLINE_EXCEEDED,)),
    ExitCode(10, "not allowed", (_S.UNAUTHENTICATED, _S.PERMISSION_DENIED)),
)

# The exit code of a failed call by its status (any status not here: EXIT_FAILURE).
EXIT_CODES: Mapping[grpc.StatusCode, int] = {
    status: row.code for row in EXIT_CODE_TABLE for status in row.statuses
}


def render_text(indent: str = "", width: int = 99) -> str:
    """The table as plain text: code, meaning and source in columns, a source too long for
    `width` continued on the next line after its "; "."""
    column = max(len(row.meaning) for row in EXIT_CODE_TABLE) + 2
    lines = []
    for row in EXIT_CODE_TABLE:
        head = f"{indent}{row.code:<4}{row.meaning:<{column}}"
        source = row.source.replace("`", "")
        if len(head) + len(source) > width and "; " in source:
            first, rest = source.split("; ", 1)
            lines += [head + first + ";", " " * len(head) + rest]
        else:
            lines.append((head + source).rstrip())
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """The table as the docs print it: code, meaning, and the statuses (and else) it is from."""
    lines = ["| code | meaning | from |", "|---|---|---|"]
    lines += [
        "|"
        + "|".join(
            f" {cell} " if cell else " " for cell in (str(row.code), row.meaning, row.source)
        )
        + "|"
        for row in EXIT_CODE_TABLE
    ]
    return "\n".join(lines) + "\n"
