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


# A markdown link's target: [text](target), not an image's or a URL's.
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*```")


def _prose(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line of markdown outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercased, punctuation dropped, spaces to
    hyphens, and -1, -2, ... after a repeated one."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose(text):
        heading = re.match(r"#{1,6} (.*)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, file, anchor) of every relative link in a page's prose: to a file, to
    a heading of a file (file.md#anchor) or of the page itself (#anchor, file empty)."""
    # Code blocks blanked, lines kept: a link's text may run over a line break.
    lines = dict(_prose(text))
    prose = "\n".join(lines.get(number, "") for number in range(1, len(text.splitlines()) + 1))
    for match in _LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        yield prose.count("\n", 0, match.start(1)) + 1, file, anchor


def test_heading_anchors_follow_github() -> None:
    """Anchors are GitHub's: code spans and punctuation go, repeats are numbered."""
    text = (
        "# API at a glance (`proto/foliod/v1/foliod.proto`)\n"
        "## Guests: the memory map paid twice\n"
        "```\n# not a heading\n```\n"
        "## Notes\n## Notes\n"
    )
    assert heading_anchors(text) == {
        "api-at-a-glance-protofoliodv1foliodproto",
        "guests-the-memory-map-paid-twice",
        "notes",
        "notes-1",
    }


def test_relative_links_are_found_and_urls_skipped() -> None:
    """The scan finds links to files and anchors, across a line break too, and skips URLs,
    images and code blocks."""
    text = (
        "See [a](a.md), [b](b.md#x) and [here](#y); [web](https://x.org/a.md), ![i](i.png).\n"
        "```\n[c](c.md)\n```\n"
        "A [link over\ntwo lines](d.md#z).\n"
    )
    assert list(relative_links(text)) == [
        (1, "a.md", ""),
        (1, "b.md", "x"),
        (1, "", "y"),
        (6, "d.md", "z"),
    ]


def test_every_relative_link_in_the_docs_resolves() -> None:
    """Each relative link in README.md and docs/*.md names a file that exists and, with an
    anchor, a heading of that file."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for number, file, anchor in relative_links(page.read_text(encoding="utf-8")):
            target = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}:{number}: {file}#{anchor}"
            if not target.exists() or (
                anchor
                and (
                    target.suffix != ".md"
                    or anchor not in heading_anchors(target.read_text(encoding="utf-8"))
                )
            ):
                broken.append(where)
    assert broken == []
