"""Tenants: namespaces at the API's edge, memory cgroups in the core (memory.max with reclaim of
the tenant's own page cache first, file and handle limits), and two tenants that never see or
change each other's state."""

from __future__ import annotations

import contextlib
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import foliodclient
from foliod.mm import FolioKind, Machine, TenantLimit, TenantLimits, check_machine
from foliod.mm.backing_dev import DEVICE_PROFILES, BackingStore
from foliod.mm.memcontrol import MemcgEvent, tenant_of_file, tenant_of_owner
from foliod.rpc.auth import DEFAULT_TENANT_LIMITS, Role, TokenTable, token_digest
from foliod.server import FoliodServer
from tests.conftest import ServerFactory

MIB = 1 << 20
PAGES_PER_MIB = MIB // 4096
TOKENS = {"admin": "admin-tok-1", "a": "tenant-a-tok-2", "b": "tenant-b-tok-3", "ra": "reader-4"}


# -- the core: memory cgroups ---------------------------------------------------------------


def _machine(tmp_path: Path, ram_mib: int = 64, **limits: TenantLimits) -> Machine:
    store = BackingStore(tmp_path / "store", DEVICE_PROFILES["nvme"])
    machine = Machine("host", ram_mib * MIB, store=store, ra_pages=0)
    machine.set_tenant_limits(limits)
    return machine


def test_names_say_whose_they_are() -> None:
    """An owner "<t>/x" and a file "tenants/<t>/x" are tenant t's; other names are no one's."""
    assert tenant_of_owner("acme/app") == "acme"
    assert tenant_of_owner("app:1") is None
    assert tenant_of_file("tenants/acme/data/x") == "acme"
    assert tenant_of_file("tenants/acme") is None
    assert tenant_of_file("data/x") is None


def test_folios_and_page_cache_are_charged_and_uncharged(tmp_path: Path) -> None:
    """Allocate charges the owner's tenant, Free and ReleaseOwner uncharge it; its files' page
    cache is charged while cached; admin names outside the namespace charge no one."""
    m = _machine(tmp_path)
    done = m.allocate("acme/app", FolioKind.FILE, order=2, count=5)
    m.allocate("other", FolioKind.FILE, order=0, count=3)
    memcg = m.memcgs["acme"]
    assert (memcg.nr_owned, memcg.nr_cache) == (20, 0)
    m.free([done.first_handle, done.first_handle + 1])
    assert memcg.nr_owned == 12
    m.files.create("tenants/acme/f")
    m.files.write("tenants/acme/f", 0, b"x" * (3 * 4096))
    assert memcg.nr_cache == 3
    check_machine(m)
    m.release_owner("acme/app")
    m.files.delete("tenants/acme/f")
    assert (memcg.nr_owned, memcg.nr_cache, memcg.nr_files) == (0, 0, 0)
    assert set(m.memcgs) == {"acme"}
    check_machine(m)


def test_allocation_over_memory_max_reclaims_own_cache_then_fails_unchanged(
    tmp_path: Path,
) -> None:
    """Over memory.max an allocation first evicts the tenant's own clean page cache (not
    another tenant's), and when its own folios leave no room fails with TenantLimit, changing
    nothing."""
    limit = TenantLimits(max_pages=4 * PAGES_PER_MIB)
    m = _machine(tmp_path, a=limit, b=limit)
    for tenant in ("a", "b"):
        name = f"tenants/{tenant}/f"
        m.files.create(name)
        for offset in range(0, 3 * MIB, MIB):
            m.files.write(name, offset, b"d" * MIB)
        m.files.writeback(name)
    a, b = m.memcgs["a"], m.memcgs["b"]
    assert a.nr_cache == b.nr_cache == 3 * PAGES_PER_MIB
    m.allocate("a/app", FolioKind.ANON, nr_bytes=2 * MIB)
    assert a.nr_pages <= limit.max_pages
    assert a.nr_cache == 2 * PAGES_PER_MIB
    assert b.nr_cache == 3 * PAGES_PER_MIB
    assert a.events[MemcgEvent.MAX] == 1
    free_before, cache_before = m.zone.nr_free, a.nr_cache
    with pytest.raises(TenantLimit) as failure:
        m.allocate("a/app", FolioKind.ANON, nr_bytes=3 * MIB)
    assert failure.value.metadata["tenant"] == "a"
    assert (m.zone.nr_free, a.nr_cache, a.nr_owned) == (free_before, cache_before, 512)
    assert a.events[MemcgEvent.OOM] == 1
    check_machine(m)


def test_page_cache_is_trimmed_back_to_memory_max(tmp_path: Path) -> None:
    """Page cache a read brought in over memory.max goes back to the limit when the call
    ends, oldest first: the pages read last stay."""
    m = _machine(tmp_path, a=TenantLimits(max_pages=PAGES_PER_MIB))
    m.files.create("tenants/a/f")
    m.files.truncate("tenants/a/f", 4 * MIB)
    m.files.read("tenants/a/f", 0, 2 * MIB)
    assert m.memcgs["a"].nr_cache == 2 * PAGES_PER_MIB
    m.enforce_memcg_limits()
    assert m.memcgs["a"].nr_cache == PAGES_PER_MIB
    inode = m.files.lookup("tenants/a/f")
    assert inode.find(2 * PAGES_PER_MIB - 1) is not None and inode.find(0) is None
    check_machine(m)


def test_file_and_handle_limits(tmp_path: Path) -> None:
    """A tenant at its file or open-handle limit gets TenantLimit; closing or deleting makes
    room again."""
    m = _machine(tmp_path, a=TenantLimits(max_files=2, max_open_files=1))
    m.files.create("tenants/a/1")
    m.files.create("tenants/a/2")
    with pytest.raises(TenantLimit):
        m.files.create("tenants/a/3")
    m.files.create("tenants/b/3")  # another tenant's count
    handle = m.files.open("tenants/a/1")
    with pytest.raises(TenantLimit):
        m.files.open("tenants/a/2")
    m.files.close(handle.number)
    m.files.open("tenants/a/2")
    m.files.delete("tenants/a/2")  # its open handle goes with it
    m.files.open("tenants/a/1")
    m.files.create("tenants/a/3")
    check_machine(m)


def test_lowered_limit_applies_to_existing_memcgs(tmp_path: Path) -> None:
    """set_tenant_limits changes the limits of tenants already charged, and removes those of
    tenants left out."""
    m = _machine(tmp_path)
    m.allocate("a/x", FolioKind.SLAB, order=0, count=4)
    m.set_tenant_limits({"a": TenantLimits(max_pages=4)})
    with pytest.raises(TenantLimit):
        m.allocate("a/x", FolioKind.SLAB, order=0, count=1)
    m.set_tenant_limits({})
    m.allocate("a/x", FolioKind.SLAB, order=0, count=1)
    assert m.memcgs["a"].nr_owned == 5


# -- the token file's tenants ------------------------------------------------------------------


def _token_file(path: Path, *, tenants: str = "") -> Path:
    entries = [
        ("admin", Role.ADMIN, ""),
        ("a", Role.TENANT, "a"),
        ("b", Role.TENANT, "b"),
        ("ra", Role.READER, "a"),
    ]
    lines = []
    for key, role, tenant in entries:
        lines += [
            "[[tokens]]",
            f'sha256 = "{token_digest(TOKENS[key])}"',
            f'principal = "{key}-user"',
            f'role = "{role.value}"',
        ]
        if tenant:
            lines.append(f'tenant = "{tenant}"')
        lines.append("")
    path.write_text("\n".join(lines) + tenants)
    return path


def test_token_file_reads_tenant_limits(tmp_path: Path) -> None:
    """[tenants.<name>] sets memory_max (a size), max_files and max_open_files; a tenant
    without a table gets the default limits."""
    table = TokenTable.load(
        _token_file(
            tmp_path / "t.toml", tenants='[tenants.a]\nmemory_max = "16MiB"\nmax_files = 3\n'
        )
    )
    assert table.limits["a"] == TenantLimits(
        max_pages=16 * PAGES_PER_MIB,
        max_files=3,
        max_open_files=DEFAULT_TENANT_LIMITS.max_open_files,
    )
    assert table.limits["b"] == DEFAULT_TENANT_LIMITS


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[tenants.a]\nmemory_max = "lots"\n', "memory_max: not a size"),
        ("[tenants.a]\nmax_files = -1\n", "max_files must be a non-negative integer"),
        ("[tenants.a]\nswap_max = 1\n", "unknown key(s) swap_max"),
        ('[tenants."a b"]\nmax_files = 1\n', "a tenant name is"),
        ('tenants = "a"\n', "'tenants' must be a table"),
    ],
)
def test_bad_tenant_tables_are_refused_with_the_reason(
    tmp_path: Path, text: str, complaint: str
) -> None:
    """A malformed [tenants] table is refused, naming the tenant and what is wrong."""
    path = _token_file(tmp_path / "t.toml", tenants="" if text.startswith("tenants") else text)
    if text.startswith("tenants"):  # a top-level key goes before the first table
        path.write_text(text + path.read_text())
    with pytest.raises(ValueError, match=f"token file .*{re.escape(complaint)}"):
        TokenTable.load(path)


def test_a_tenant_token_must_name_its_tenant(tmp_path: Path) -> None:
    """A token of role tenant without a tenant would act on the whole server: refused."""
    path = tmp_path / "t.toml"
    path.write_text(
        f'[[tokens]]\nsha256 = "{token_digest("x")}"\nprincipal = "p"\nrole = "tenant"\n'
    )
    with pytest.raises(ValueError, match="names its tenant"):
        TokenTable.load(path)


# -- through the API ----------------------------------------------------------------------------


@pytest.fixture
def tenant_server(make_server: ServerFactory, tmp_path: Path) -> FoliodServer:
    tokens = _token_file(
        tmp_path / "tokens.toml",
        tenants='[tenants.a]\nmemory_max = "8MiB"\nmax_files = 50\nmax_open_files = 20\n',
    )
    return make_server(tokens=tokens, ram=128 * MIB)


@pytest.fixture
def clients(tenant_server: FoliodServer) -> Iterator[dict[str, foliodclient.FoliodClient]]:
    made = {
        key: foliodclient.FoliodClient(
            f"127.0.0.1:{tenant_server.grpc_port}", token=token, timeout=10
        )
        for key, token in TOKENS.items()
    }
    yield made
    for client in made.values():
        client.close()


def test_tenants_see_only_their_own_names(clients: dict[str, Any]) -> None:
    """Two tenants use the same names without meeting; the admin sees both under their full
    names; another tenant's folio or file handle is NOT_FOUND, as one never given out."""
    a, b, admin = clients["a"], clients["b"], clients["admin"]
    a.create_file("f")
    a.write_file("f", b"from a")
    with pytest.raises(foliodclient.UnknownFile):
        b.stat_file("f")
    b.create_file("f")
    b.write_file("f", b"b's")
    assert a.read_file("f", 6).data == b"from a"
    assert [s.name for s in a.list_files()] == ["f"]
    assert {s.name for s in admin.list_files()} == {"tenants/a/f", "tenants/b/f"}
    folio = a.allocate("app", "file", order=0, count=2)
    assert a.get_folio(folio.first_handle).owner == "app"
    assert admin.get_folio(folio.first_handle).owner == "a/app"
    with pytest.raises(foliodclient.UnknownFolio):
        b.get_folio(folio.first_handle)
    with pytest.raises(foliodclient.UnknownFolio):
        b.free([folio.first_handle])
    with pytest.raises(foliodclient.UnknownOwner):
        b.release_owner("app")
    handle = a.open_file("f")
    with pytest.raises(foliodclient.UnknownFileHandle):
        b.fsync(handle)
    with pytest.raises(foliodclient.UnknownFileHandle):
        b.close_file(handle)
    with pytest.raises(foliodclient.UnknownFileHandle):
        b.read_file("", 4, handle=handle)
    # Nothing of a's was touched by b's attempts.
    a.free([folio.first_handle])
    a.close_file(handle)
    assert clients["ra"].list_files()[0].name == "f"  # a reader bound to tenant a


def test_tenant_memory_max_through_the_api(
    clients: dict[str, Any], tenant_server: FoliodServer
) -> None:
    """Tenant a (memory.max 8 MiB) cannot allocate past it: RESOURCE_EXHAUSTED with reason
    TENANT_LIMIT; its page cache stays under the limit after a large read; b has no limit."""
    a, b = clients["a"], clients["b"]
    a.allocate("app", "anon", size_bytes=6 * MIB)
    with pytest.raises(foliodclient.TenantLimit) as failure:
        a.allocate("app", "anon", size_bytes=4 * MIB)
    assert failure.value.code.name == "RESOURCE_EXHAUSTED"
    a.create_file("big")
    a.truncate_file("big", 16 * MIB)
    for offset in range(0, 16 * MIB, 2 * MIB):
        a.read_file("big", 2 * MIB, offset)
    memcg = tenant_server.machines.host.memcgs["a"]
    assert memcg.nr_pages <= 8 * PAGES_PER_MIB
    assert memcg.nr_cache > 0
    b.allocate("app", "anon", size_bytes=16 * MIB)
    scrape = _scrape(tenant_server)
    assert 'foliod_tenant_memory_max_bytes{machine="host",tenant="a"} 8.388608e+06' in scrape
    assert 'foliod_tenant_memory_events_total{event="oom",machine="host",tenant="a"} 1.0' in scrape


def test_tenant_file_limit_through_the_api(clients: dict[str, Any]) -> None:
    """Past max_files (50) a tenant's CreateFile is RESOURCE_EXHAUSTED (TENANT_LIMIT)."""
    a = clients["a"]
    for i in range(50):
        a.create_file(f"n{i}")
    with pytest.raises(foliodclient.TenantLimit):
        a.create_file("one-more")
    clients["b"].create_file("one-more")


def test_submit_batches_stay_in_the_namespace(clients: dict[str, Any]) -> None:
    """A tenant's Submit batch reads and writes its own files and allocates for its own owners;
    another tenant's handle in a batch fails that operation with NOT_FOUND."""
    a, b, admin = clients["a"], clients["b"], clients["admin"]
    a.create_file("log")
    foreign = b.allocate("app", "slab", order=0, count=1).first_handle
    batch = foliodclient.Batch()
    batch.write("log", 0, b"hello")
    batch.read("log", 0, 5)
    batch.allocate("worker", "slab", order=0, count=1)
    batch.free(foreign)
    with a.open_submission(timeout=10) as submission:
        results = submission.submit(batch)
    assert results.error is None
    assert results[1].data == b"hello"
    assert results[3].error is not None and results[3].error.code.name == "NOT_FOUND"
    assert admin.get_folio(results[2].first_handle).owner == "a/worker"
    assert b.get_folio(foreign).owner == "app"


def _scrape(server: FoliodServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


# -- isolation under random operations ---------------------------------------------------------

_NAMES = st.sampled_from(["f", "g", "dir/h"])
_OPS = st.one_of(
    st.tuples(st.just("create"), _NAMES),
    st.tuples(st.just("write"), _NAMES, st.integers(0, 3), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _NAMES),
    st.tuples(st.just("allocate"), st.sampled_from(["o1", "o2"]), st.integers(1, 3)),
    st.tuples(st.just("free_other"), st.integers(0, 5)),
    st.tuples(st.just("release"), st.sampled_from(["o1", "o2"])),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.tuples(st.sampled_from("ab"), _OPS), min_size=1, max_size=12))
def test_two_tenants_never_see_or_change_each_other(
    clients: dict[str, Any], tenant_server: FoliodServer, steps: list[tuple[str, Any]]
) -> None:
    """Random operations of two tenants, each checked against a model of its own files and
    folios: after every step both tenants' views equal their models, and an operation on the
    other tenant's folio fails NOT_FOUND."""
    for client in (clients["a"], clients["b"]):  # a clean start for this example
        for stat in client.list_files():
            client.delete_file(stat.name)
        for owner in ("o1", "o2"):
            with contextlib.suppress(foliodclient.UnknownOwner):
                client.release_owner(owner)
    files: dict[str, dict[str, bytes]] = {"a": {}, "b": {}}
    folios: dict[str, dict[str, list[int]]] = {"a": {}, "b": {}}
    for tenant, op in steps:
        client, mine = clients[tenant], files[tenant]
        other = "b" if tenant == "a" else "a"
        kind, *args = op
        if kind == "create":
            if args[0] in mine:
                with pytest.raises(foliodclient.AlreadyExists):
                    client.create_file(args[0])
            else:
                client.create_file(args[0])
                mine[args[0]] = b""
        elif kind == "write":
            name, block, data = args
            if name not in mine:
                with pytest.raises(foliodclient.UnknownFile):
                    client.write_file(name, data, block * 4096)
                continue
            client.write_file(name, data, block * 4096)
            grown = bytearray(mine[name].ljust(block * 4096 + len(data), b"\0"))
            grown[block * 4096 : block * 4096 + len(data)] = data
            mine[name] = bytes(grown)
        elif kind == "delete":
            if args[0] in mine:
                client.delete_file(args[0])
                del mine[args[0]]
            else:
                with pytest.raises(foliodclient.UnknownFile):
                    client.delete_file(args[0])
        elif kind == "allocate":
            done = client.allocate(args[0], "slab", order=0, count=args[1])
            folios[tenant].setdefault(args[0], []).extend(
                range(done.first_handle, done.first_handle + done.count)
            )
        elif kind == "free_other":
            theirs = [h for hs in folios[other].values() for h in hs]
            if theirs:
                with pytest.raises(foliodclient.UnknownFolio):
                    client.free([theirs[args[0] % len(theirs)]])
        elif args[0] in folios[tenant]:
            client.release_owner(args[0])
            del folios[tenant][args[0]]
        else:
            with pytest.raises(foliodclient.UnknownOwner):
                client.release_owner(args[0])
        for t in ("a", "b"):
            view = clients[t]
            assert {s.name: s.size_bytes for s in view.list_files()} == {
                n: len(c) for n, c in files[t].items()
            }
            for name, content in files[t].items():
                if content:
                    assert view.read_file(name, len(content)).data == content
            for owner, handles in folios[t].items():
                assert {view.get_folio(h).owner for h in handles} == {owner}
