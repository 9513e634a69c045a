"""Every repository path the docs and comments name exists, and the Layout in docs/development.md
is the tree."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A repository path: one of the top folders, then path characters. Not one inside a longer path
# or a URL (nothing path-like just before it).
_PATH = re.compile(
    r"(?<![\w./-])((?:server|client|tests|proto|deploy|docs|benchmarks|\.ci)/[\w./-]*)"
)
# A path that goes on with one of these is a pattern, not a path: <name>, {a,b}, *.md.
_PATTERN_NEXT = ("<", "{", "*")
_SKIPPED_PARTS = {"__pycache__", "fixtures", "v1"}  # caches, recorded data, generated code


def _files() -> Iterator[Path]:
    """README.md, docs/*.md, the Makefile, CI, the proto and every source or config file under
    the top folders (generated code, recorded fixtures and caches excepted)."""
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield ROOT / "Makefile"
    yield ROOT / ".ci" / "run"
    yield from sorted((ROOT / "proto").rglob("*.proto"))
    for top in ("server", "client", "tests", "benchmarks", "deploy"):
        for path in sorted((ROOT / top).rglob("*")):
            relative = path.relative_to(ROOT)
            if (
                path.is_file()
                and path.suffix in {".py", ".yml", ".yaml", ".toml", ".md", ""}
                and not _SKIPPED_PARTS.intersection(relative.parts)
                and not any(part.endswith(".egg-info") for part in relative.parts)
                and path != Path(__file__).resolve()  # its examples name made-up paths
            ):
                yield path


def named_paths(text: str) -> Iterator[tuple[int, str]]:
    """(line number, path) of every repository path named in text."""
    for number, line in enumerate(text.splitlines(), 1):
        for match in _PATH.finditer(line):
            if line[match.end() : match.end() + 1] in _PATTERN_NEXT:
                continue
            yield number, match.group(1).rstrip(".-")


def test_named_paths_are_found_and_patterns_skipped() -> None:
    """The scan finds paths in prose, code spans and comments, and skips patterns and URLs."""
    text = (
        "See `tests/test_x.py::test_y` and docs/a.md.\n"
        "# deploy/kubernetes/overlays/<name>, server/foliod/{a,b}.py, docs/*.md\n"
        "https://example.com/docs/page and x/tests/nested are not paths; (.ci/run) is.\n"
    )
    assert list(named_paths(text)) == [
        (1, "tests/test_x.py"),
        (1, "docs/a.md"),
        (3, ".ci/run"),
    ]


def test_every_path_named_in_docs_and_comments_exists() -> None:
    """Each repository path in README.md, docs/, comments, docstrings and config exists."""
    missing = [
        f"{path.relative_to(ROOT)}:{number}: {named}"
        for path in _files()
        for number, named in named_paths(path.read_text(encoding="utf-8"))
        if not (ROOT / named).exists()
    ]
    assert missing == []


def _layout_entries(block: str) -> Iterator[str]:
    """Paths in the Layout block of docs/development.md: a folder at the start of a line, then
    the files and folders (name.py, name/) its indented lines and descriptions name, relative to
    it."""
    folder = ""
    for line in block.splitlines():
        head, _, rest = line.partition(" ")
        if line and not line[0].isspace():
            braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", head)
            heads = (
                [braces[1] + name + braces[3] for name in braces[2].split(",")]
                if braces
                else [head]
            )
            yield from heads
            folder = head if head.endswith("/") else ""
        else:
            rest = line
        if folder:
            # name.py, or name/ ending a word ("grpc/protobuf" is not a folder).
            for name in re.findall(r"(?<![\w./-])(\w+\.py|\w+/(?=\s|$))", rest):
                yield folder + name


def test_layout_names_files_where_they_are() -> None:
    """Every file and folder the Layout block of docs/development.md names is where it puts it."""
    page = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    block = page.split("## Layout\n\n```\n", 1)[1].split("```", 1)[0]
    entries = list(_layout_entries(block))
    assert "server/foliod/mm/filemap.py" in entries
    assert "server/foliod/rpc/reflection.py" in entries
    missing = [entry for entry in entries if not (ROOT / entry).exists()]
    assert missing == []
    # And every module of the core and the rpc layer is in it.
    modules = {
        str(path.relative_to(ROOT))
        for path in itertools.chain(
            (ROOT / "server" / "foliod" / "mm").glob("*.py"),
            (ROOT / "server" / "foliod" / "rpc").glob("*.py"),
        )
        if path.name != "__init__.py"
    }
    assert modules - set(entries) == set()
