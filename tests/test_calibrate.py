"""foliod-calibrate: folios from kpageflags, the step-by-step comparison, and a live run against
this machine's kernel checked against the fixture recorded on it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from foliod.calibrate import (
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    PATTERNS,
    FoliodSide,
    Step,
    calibrate,
    can_read_frames,
    first_difference,
    folios_from_frames,
    kernel_record,
    main,
    pattern_file_size,
    run_pattern,
)

FIXTURE = Path(__file__).with_name("fixtures") / "calibration-linux.json"
RECORDED = json.loads(FIXTURE.read_text())
WORK = Path(__file__).resolve().parent.parent


def test_folios_from_frames_reads_heads_tails_and_base_pages() -> None:
    """A head and the tails on the frames after it are one folio; a page with neither bit is an
    order-0 folio; a tail whose frame does not follow ends the run."""
    head, tail = KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL
    frames = {
        0: (100, 0),
        4: (200, head),
        5: (201, tail),
        6: (202, tail),
        7: (203, tail),
        8: (300, head),
        9: (999, tail),  # not the next frame: not part of the folio at 8
    }
    assert folios_from_frames(frames) == ((0, 0), (4, 2), (8, 0))


def test_first_difference_is_the_lowest_page_on_one_side_only() -> None:
    """Equal sets have none; otherwise the lowest page cached on exactly one side."""
    assert first_difference(frozenset({1, 2}), frozenset({1, 2})) is None
    assert first_difference(frozenset({1, 2, 9}), frozenset({1, 5, 9})) == 2


def test_foliod_side_caches_what_its_reads_bring_in(tmp_path: Path) -> None:
    """The foliod side starts with nothing cached (written back and dropped), and a first
    4 KiB read brings in the initial readahead window through two handles alike."""
    side = FoliodSide(tmp_path, 4 << 20, ra_pages=32, max_order=9)
    assert side.snapshot(with_folios=True).resident == frozenset()
    side.apply(Step("read", 0, 4096))
    first = side.snapshot(with_folios=True)
    assert 0 in first.resident and len(first.resident) > 1
    assert first.folios is not None
    assert sum(1 << order for _, order in first.folios) == len(first.resident)
    side.apply(Step("read", 2 << 20, 4096, handle=1))
    assert (2 << 20) // 4096 in side.snapshot(with_folios=False).resident


def test_every_pattern_stays_inside_the_file() -> None:
    """Each pattern's steps lie within a 16 MiB file and use handle 0 or 1."""
    size = 16 << 20
    for name, make in PATTERNS.items():
        steps = make(size)
        assert steps, name
        assert all(s.offset >= 0 and s.offset + s.length <= size for s in steps), name
        assert {s.handle for s in steps} <= {0, 1}, name


def test_the_cli_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """Sizes and orders out of range and a missing directory are usage errors (exit 2)."""
    for argv in (
        ["--size-mib", "0"],
        ["--max-order", "12"],
        ["--dir", "/nonexistent/x"],
        ["--retries", "11"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def _foliod_run(pattern: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The foliod side alone through a pattern, set up as the fixture was recorded: the cached
    page counts it goes through and its folios at the end."""
    size = pattern_file_size(pattern, RECORDED["size_mib"] << 20)
    with tempfile.TemporaryDirectory(prefix="foliod-calibrate-") as store:
        side = FoliodSide(
            Path(store),
            size,
            ra_pages=RECORDED["read_ahead_kb"] // 4,
            max_order=RECORDED["max_order"],
        )
        counts: list[int] = []
        for step in PATTERNS[pattern](size):
            side.apply(step)
            cached = len(side.snapshot(with_folios=False).resident)
            if not counts or counts[-1] != cached:
                counts.append(cached)
        folios = side.snapshot(with_folios=True).folios
    assert folios is not None
    return counts, list(folios)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", sorted(RECORDED["patterns"]))
def test_foliod_goes_through_what_the_kernel_recorded(pattern: str) -> None:
    """On every recorded pattern foliod's page cache passes through the same cached page counts
    as Linux 6.18 did, step by step, and ends with the same folios at the same indices."""
    expected = RECORDED["patterns"][pattern]
    assert expected["reclaimed_outside"] == 0, "re-record: the kernel's run was disturbed"
    counts, folios = _foliod_run(pattern)
    assert folios == [tuple(f) for f in expected["folios"]]
    assert counts == expected["windows"]


def test_every_pattern_is_recorded() -> None:
    """The fixture holds every pattern foliod-calibrate knows (re-record after adding one)."""
    assert sorted(RECORDED["patterns"]) == sorted(PATTERNS)


def _live_reason() -> str | None:
    if not can_read_frames():
        return "needs root and /proc/kpageflags (folio orders from pagemap and kpageflags)"
    if os.uname().release != RECORDED["kernel"]:
        return (
            f"the fixture was recorded on Linux {RECORDED['kernel']}, this is {os.uname().release}"
        )
    return None


@pytest.mark.slow
@pytest.mark.skipif(_live_reason() is not None, reason=str(_live_reason()))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_the_live_kernel_and_foliod_agree_page_for_page(tmp_path: Path, pattern: str) -> None:
    """On the kernel the fixture was recorded on, each pattern leaves the same pages cached on
    both sides after every step and the same folios at the end; when nothing else reclaimed
    the file's pages meanwhile, the kernel's folios are the fixture's."""
    size = RECORDED["size_mib"] << 20
    # On the work tree's filesystem (ext4, as recorded), not a tmpfs.
    with tempfile.TemporaryDirectory(dir=WORK, prefix=".calibrate-") as directory:
        (result,) = calibrate(
            [pattern],
            Path(directory),
            size,
            ra_pages=RECORDED["read_ahead_kb"] // 4,
            max_order=RECORDED["max_order"],
            frames=True,
        )
    assert result.first_divergent_step is None, result.rows
    assert result.folios_compared and result.folios_agree
    if not result.reclaimed_outside:
        expected = RECORDED["patterns"][pattern]
        assert kernel_record(result)["folios"] == [tuple(f) for f in expected["folios"]]


class _ReclaimedFoliodSide(FoliodSide):
    """A foliod side standing in for the kernel, whose page 2 something else reclaims after
    the second step."""

    steps = 0

    def apply(self, step: Step) -> None:
        super().apply(step)
        self.steps += 1
        if self.steps == 2:
            self.evict(frozenset({2}))


def test_pages_reclaimed_from_outside_are_evicted_on_the_foliod_side_too(tmp_path: Path) -> None:
    """When the kernel's cache loses pages the pattern did not drop (DAMON's pageout here), the
    foliod side evicts the same folios, so both go on from the same cache and agree; the run
    says how many pages it lost."""
    steps = [Step("read", 0, 4096), Step("read", 4096, 4096), Step("read", 8192, 4096)]
    kernel = _ReclaimedFoliodSide(tmp_path / "k", 1 << 20, ra_pages=32, max_order=9)
    foliod = FoliodSide(tmp_path / "f", 1 << 20, ra_pages=32, max_order=9)
    result = run_pattern("test", steps, kernel, foliod)  # type: ignore[arg-type]
    assert result.reclaimed_outside == 1
    assert result.agrees
    # Page 2 was read again by the third step (a miss on both sides).
    assert 2 in foliod.snapshot(with_folios=False).resident
