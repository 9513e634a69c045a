"""The foliod command: parse the configuration, serve until SIGTERM or SIGINT, exit 0."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import structlog

from foliod.config import ConfigError, load_config
from foliod.logs import configure_logging
from foliod.server import FoliodServer


def main(argv: Sequence[str] | None = None) -> int:
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
    while not stop.wait(3600):
        pass
    if not server.stop():
        # grpc never finished stopping: the store is synced and the log written, so leave
        # now rather than risk the interpreter's exit waiting on grpc's leftovers.
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
