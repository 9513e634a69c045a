"""The foliod command: parse the configuration, serve until SIGTERM or SIGINT, exit 0."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import structlog

from foliod.config import ConfigError, load_config
from foliod.logs import configure_logging
from foliod.server import FoliodServer

# mallopt's M_MMAP_THRESHOLD, and the threshold foliod fixes it at.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 << 10


def fix_mmap_threshold() -> bool:
    """Keeps glibc's mmap threshold at 128 KiB. By default glibc raises it to the size of each
    mmapped block freed, so the folio columns' arrays, grown by realloc, come to live in the
    heap, where each move leaves a hole the heap never gives back (about 40% more RSS per
    cached page, measured). Above the threshold a growing array is moved by mremap, which
    leaves none. False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def wait_for_signals(stop: threading.Event) -> None:
    """Sleeps until a signal handler sets stop. The kernel hands a process-directed signal to
    any thread that does not block it, often one of grpc's; Python then runs the handler only
    when the main thread next runs bytecode, which a plain stop.wait() would delay until its
    timeout. The signal also writes to a wakeup pipe (signal.set_wakeup_fd), whatever thread
    took it, so the main thread wakes from poll() at once and runs the handler."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    # poll, not select: a server with many backing files open may hold descriptors past
    # select's FD_SETSIZE (1024).
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    try:
        while not stop.is_set():
            poller.poll(60_000)
            with contextlib.suppress(BlockingIOError):
                os.read(read_end, 512)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)


def main(argv: Sequence[str] | None = None) -> int:
    fix_mmap_threshold()
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"foliod: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    log = structlog.get_logger("foliod")
    log.info("config", **config.as_log_fields())
    try:
        server = FoliodServer(config)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("cannot start", error=str(exc))
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        log.info("signal", signal="SIGHUP")
        server.reload()

    # Before start() logs "started": a signal sent as soon as that line appears finds its
    # handler (SIGHUP's default action would end the process).
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("cannot start", error=str(exc))
        return 1
    wait_for_signals(stop)
    if not server.stop():
        # grpc never finished stopping: the store is synced and the log written, so leave
        # now rather than risk the interpreter's exit waiting on grpc's leftovers.
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
