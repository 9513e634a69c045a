"""One server per state directory: a second one on the same directory refuses to start, naming
the holder, and the directory is free again once the first stops or is killed. And the main
loop's signal handling, which the start and stop of such servers rely on."""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pytest

from foliod.main import wait_for_signals
from foliod.server import FoliodServer
from foliod.state_lock import StateDirInUse, StateDirLock
from tests.conftest import ServerFactory, ServerProcess


def test_a_second_lock_on_one_directory_is_refused_until_released(tmp_path: Path) -> None:
    """The lock names the holder's pid; released, the directory can be taken again."""
    first = StateDirLock(tmp_path / "state")
    with pytest.raises(StateDirInUse, match=r"in use by another foliod \(pid \d+\)"):
        StateDirLock(tmp_path / "state")
    first.release()
    first.release()  # a second release does nothing
    StateDirLock(tmp_path / "state").release()


def test_an_in_process_server_holds_its_state_directory(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    """A second server on a running server's directory fails at construction and leaves the
    first one serving; after stop() the directory takes a new server."""
    running = make_server()
    config = running.config
    with pytest.raises(StateDirInUse, match=str(config.state_dir)):
        FoliodServer(config)
    assert running.machines.get("") is not None
    running.stop(0)
    again = FoliodServer(dataclasses.replace(config))
    again.start()
    again.stop(0)


def test_a_second_process_exits_and_a_killed_one_leaves_the_directory_free(
    spawn: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """foliod on a directory another foliod holds exits 1 with an error naming it; once the
    holder is killed with SIGKILL (no clean-up at all), the directory takes a new server."""
    holder = spawn()
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "foliod.main",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "var"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1
    assert "in use by another foliod" in second.stderr
    assert f"pid {holder.proc.pid}" in second.stderr
    holder.kill()
    replacement = spawn()
    assert replacement.proc.poll() is None


@pytest.mark.parametrize("many_files", [False, True])
def test_a_signal_taken_by_another_thread_wakes_the_main_loop(many_files: bool) -> None:
    """A signal the kernel hands to a thread other than the main one (grpc's, in foliod) still
    runs its handler at once: wait_for_signals wakes on the wakeup pipe, where a plain
    Event.wait would sleep on until its timeout; also when the pipe's descriptors lie past
    select()'s 1024 (a server with many backing files open). A fallback ends the wait after
    30 s so that a regression fails instead of hanging; the test checks the handler, not the
    fallback, ended it."""
    held: list[int] = []
    if many_files:
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1100:
            pytest.skip("needs a descriptor limit of 1,100 or more")
        while not held or held[-1] < 1030:
            held.append(os.dup(0))
    stop = threading.Event()
    ended_by: list[str] = []

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        ended_by.append("handler")
        stop.set()

    def other_thread() -> None:
        time.sleep(0.2)  # the main thread is in wait_for_signals by then, or about to be
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # delivered to this thread
        if not stop.wait(30):
            ended_by.append("fallback")
            stop.set()

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    thread = threading.Thread(target=other_thread)
    try:
        thread.start()
        wait_for_signals(stop)
    finally:
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
        for fd in held:
            os.close(fd)
    assert ended_by == ["handler"]
