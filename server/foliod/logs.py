"""structlog set-up: JSON lines (or console) on stderr, one event per line.

Access lines (one per RPC) are the hottest log call by far: in JSON format they are rendered
here directly, in the same shape structlog's JSONRenderer gives every other event (at 8 RPCs
in flight structlog's processor chain was an eighth of the server's CPU time).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterable
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


class _Output:
    """Where and how events are written, as configure_logging last set it."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.json = True
        self.stream: TextIO = sys.stderr
        self.lock = threading.Lock()
        # The timestamp's whole seconds, formatted once per second: (second, text), replaced
        # as one object so threads never pair one second with another's text.
        self.stamp = (-1, "")


_output = _Output()


class _LineLogger:
    """structlog's logger: each rendered event is one write of one line under the output's
    lock, so events from many threads (access lines included) never interleave."""

    def msg(self, message: str) -> None:
        out = _output
        with out.lock:
            out.stream.write(message + "\n")
            out.stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def _line_logger(*args: object) -> _LineLogger:
    return _LineLogger()


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    target = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_line_logger,
        cache_logger_on_first_use=True,
    )
    _output.level = _LEVELS[level]
    _output.json = fmt == "json"
    _output.stream = target


_access_log = structlog.get_logger("foliod.access")


# One access line's fields: method, grpc_type, peer, code, duration_ms, request_id and the
# time.time() the call ended at.
AccessRow = tuple[str, str, str, str, float, str, float]


def render_access(
    method: str,
    *,
    grpc_type: str,
    peer: str,
    code: str,
    duration_ms: float,
    request_id: str,
    at: float | None = None,
) -> str:
    """The access line for one call ended at time.time() `at` (default now), newline
    included, for write_lines; "" when the level drops it. Console-format lines go through
    structlog at once (stamped when written) and also return ""."""
    now = time.time() if at is None else at
    return render_access_lines([(method, grpc_type, peer, code, duration_ms, request_id, now)])


def render_access_lines(rows: Iterable[AccessRow]) -> str:
    """The access lines of a batch of calls, as render_access renders each; the method and
    peer strings, which repeat, are JSON-quoted once per batch."""
    out = _output
    if out.level > logging.INFO:
        return ""
    if not out.json:
        for method, grpc_type, peer, code, duration_ms, request_id, _ in rows:
            _access_log.info(
                "rpc",
                method=method,
                grpc_type=grpc_type,
                peer=peer,
                code=code,
                duration_ms=duration_ms,
                request_id=request_id,
            )
        return ""
    quoted: dict[str, str] = {}
    lines = []
    cached, second_text = out.stamp
    for method, grpc_type, peer, code, duration_ms, request_id, now in rows:
        method_json = quoted.get(method)
        if method_json is None:
            method_json = quoted[method] = _json_string(method)
        peer_json = quoted.get(peer)
        if peer_json is None:
            peer_json = quoted[peer] = _json_string(peer)
        second = int(now)
        if second != cached:
            cached, second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            out.stamp = (cached, second_text)
        lines.append(
            f'{{"method": {method_json}, "grpc_type": "{grpc_type}", '
            f'"peer": {peer_json}, "code": "{code}", "duration_ms": {duration_ms}, '
            f'"request_id": {_json_string(request_id)}, "event": "rpc", "level": "info", '
            f'"timestamp": "{second_text}.{int((now - second) * 1e6):06d}Z"}}\n'
        )
    return "".join(lines)


def _json_string(text: str) -> str:
    """text as a JSON string, as json.dumps writes it; plain printable ASCII without quotes
    or backslashes (method names, peers, generated request ids) needs no escaping."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def write_lines(text: str) -> None:
    """Writes whole rendered lines in one write under the output's lock."""
    if not text:
        return
    out = _output
    with out.lock:
        out.stream.write(text)
        out.stream.flush()
