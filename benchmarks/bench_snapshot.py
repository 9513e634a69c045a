"""Benchmark of snapshots: time to take one, file size per GiB of RAM, time to decode and boot it,
for this host (needs a readable /proc/kpageflags) and for a fragmented simulated machine.
Run: .venv/bin/python -m benchmarks.bench_snapshot
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable

from foliod.mm import FolioKind, Machine
from foliod.mm import kpageflags as kpf
from foliod.mm import snapshot as snap

GIB = 1 << 30


def _median_seconds(run: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def figures(label: str, take: Callable[[], snap.Snapshot]) -> None:
    taking = _median_seconds(take)
    tracemalloc.start()
    layout = take()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    data = layout.encode()
    gib = layout.nr_frames * 4096 / GIB
    decoding = _median_seconds(lambda: snap.decode(data))
    checked = snap.decode(data)

    def boot() -> None:
        snap.boot(checked, Machine("boot", layout.nr_frames * 4096))

    booting = _median_seconds(boot)
    print(
        f"{label}: {gib:.1f} GiB, {len(checked.kind)} runs; snapshot {taking:.3f} s "
        f"(peak traced memory {peak / (1 << 20):.1f} MiB); file {len(data)} bytes "
        f"({len(data) / gib / 1024:.1f} KiB per GiB); decode {decoding:.3f} s; "
        f"boot {booting:.3f} s (medians of 3)"
    )


def fragmented(ram_bytes: int) -> Machine:
    """A machine whose RAM is half order-0 page cache and slab, every other folio freed."""
    machine = Machine("sim", ram_bytes)
    cache = machine.allocate("cache", FolioKind.FILE, order=0, count=ram_bytes // 4096 // 4)
    slab = machine.allocate("slab", FolioKind.SLAB, order=0, count=ram_bytes // 4096 // 4)
    machine.allocate("thp", FolioKind.ANON, order=9, count=ram_bytes // (2 << 20) // 8)
    for first, count in ((cache.first_handle, cache.count), (slab.first_handle, slab.count)):
        machine.free(list(range(first, first + count, 2)))
    return machine


def main() -> None:
    if kpf.readable():
        figures("this host (kpageflags)", snap.snapshot_host)
    else:
        print("this host: skipped, /proc/kpageflags is not readable (needs root)")
    machine = fragmented(4 * GIB)
    figures("simulated, fragmented", lambda: snap.snapshot_machine(machine))


if __name__ == "__main__":
    main()
