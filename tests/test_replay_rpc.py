"""The Replay RPC: a trace replayed through gRPC, in order, gets the exact miss counts of
textbook LRU, FIFO and CLOCK written here; bad chunks are refused whole, changing nothing."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from foliod.rpc import replay
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliodclient import AsyncFoliodClient, FoliodClient, InvalidArgument, NotFound, ReplayResult
from foliodclient._calls import replay_chunks
from tests.conftest import ServerFactory, connect

PAGE = 4096
FILE_PAGES = 512
CAPACITY = 64


def block_trace(seed: int = 15, n: int = 6000) -> list[int]:
    """Page keys mixing a hot set, sequential scans and random reads, like a block trace."""
    rng = random.Random(seed)
    keys: list[int] = []
    while len(keys) < n:
        shape = rng.random()
        if shape < 0.5:
            keys.append(rng.randrange(48))  # hot set
        elif shape < 0.6:
            start = rng.randrange(FILE_PAGES - 40)
            keys.extend(range(start, start + rng.randrange(4, 40)))
        else:
            keys.append(rng.randrange(FILE_PAGES))
    return keys[:n]


def lru_misses(keys: list[int], capacity: int) -> int:
    """Textbook LRU: a hit moves the page to the tail, a miss evicts the head when full."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for key in keys:
        if key in cache:
            cache.move_to_end(key)
            continue
        misses += 1
        if len(cache) == capacity:
            cache.popitem(last=False)
        cache[key] = None
    return misses


def fifo_misses(keys: list[int], capacity: int) -> int:
    """Textbook FIFO: hits change nothing, a miss evicts the oldest page when full."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for key in keys:
        if key in cache:
            continue
        misses += 1
        if len(cache) == capacity:
            cache.popitem(last=False)
        cache[key] = None
    return misses


def clock_misses(keys: list[int], capacity: int) -> int:
    """Second chance: a hit sets the page's bit; the hand clears set bits as it passes and
    takes the first page without one. A new page goes in behind the hand, its bit clear."""
    face: OrderedDict[int, bool] = OrderedDict()
    misses = 0
    for key in keys:
        if key in face:
            face[key] = True
            continue
        misses += 1
        if len(face) == capacity:
            while True:
                head, referenced = next(iter(face.items()))
                if not referenced:
                    del face[head]
                    break
                face[head] = False
                face.move_to_end(head)
        face[key] = False
    return misses


REFERENCES: dict[str, Callable[[list[int], int], int]] = {
    "lru": lru_misses,
    "fifo": fifo_misses,
    "clock": clock_misses,
}


def start(make_server: ServerFactory, policy: str) -> FoliodServer:
    return make_server(
        reclaim_policy=policy,
        cache_capacity=CAPACITY * PAGE,
        ra_kb=0,
        max_file_order=0,
        debug_checks=False,
    )


def client_of(server: FoliodServer) -> FoliodClient:
    return FoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=30)


@pytest.mark.parametrize("policy", sorted(REFERENCES))
def test_replay_gets_the_textbook_miss_counts(make_server: ServerFactory, policy: str) -> None:
    """Page keys replayed through the RPC miss exactly as the reference policy does, and the
    interval series adds up to the totals."""
    keys = block_trace()
    server = start(make_server, policy)
    with client_of(server) as client:
        client.create_file("trace")
        client.truncate_file("trace", FILE_PAGES * PAGE)
        result = client.replay("trace", [k * PAGE for k in keys], interval_accesses=1000)
        assert client.stat_file("trace").nr_cached == CAPACITY
    expected = REFERENCES[policy](keys, CAPACITY)
    totals = result.totals
    assert totals.stats.pages_missed == expected
    assert totals.stats.pages_hit == len(keys) - expected
    assert totals.read_stats == totals.stats
    assert totals.stats.pages_readahead == 0
    assert (totals.operations, totals.accesses) == (len(keys), len(keys))
    assert totals.evictions == expected - CAPACITY
    assert totals.stats.device_seconds > 0 and totals.elapsed_seconds > 0
    assert totals.nr_cached == CAPACITY
    assert {str(m.model) for m in totals.memmap} == {"struct_page", "interim", "memdesc"}
    assert [i.accesses for i in result.intervals] == [1000] * 6
    assert sum(i.stats.pages_missed for i in result.intervals) == expected
    assert sum(i.evictions for i in result.intervals) == totals.evictions
    assert sum(i.refaults for i in result.intervals) == totals.refaults
    assert sum(i.operations for i in result.intervals) == len(keys)


def test_the_order_survives_chunking(make_server: ServerFactory) -> None:
    """A trace sent in many small chunks runs as one sent in a single chunk."""
    keys = block_trace(seed=3, n=3000)
    offsets = [k * PAGE for k in keys]
    chunks = list(replay_chunks("trace", offsets, chunk_ops=257))
    assert len(chunks) == 12
    server = start(make_server, "lru")
    channel, stub = connect(server)
    with channel:
        with client_of(server) as client:
            client.create_file("trace")
            client.truncate_file("trace", FILE_PAGES * PAGE)
        reply = stub.Replay(iter(chunks), timeout=30)
    assert reply.totals.stats.pages_missed == lru_misses(keys, CAPACITY)


def test_multi_page_reads_writes_and_files_run_in_order(make_server: ServerFactory) -> None:
    """Reads of several pages count each page; writes dirty what they write; operations on
    two files share one cache, in the order sent."""
    server = start(make_server, "lru")
    with client_of(server) as client:
        for name in ("a", "b"):
            client.create_file(name)
            client.truncate_file(name, 64 * PAGE)
        # a: read 0..3 (4 misses); b: write page 10 (a miss); a: read 2..3 (2 hits);
        # b: read page 10 (a hit); a: the page holding byte 5000 (page 1, a hit).
        result = client.replay(
            ["a", "b"],
            [0, 10 * PAGE, 2 * PAGE, 10 * PAGE + 100, 5000],
            [4 * PAGE, 100, 2 * PAGE, 1, 1],
            [0, 1, 0, 0, 0],
            [0, 1, 0, 1, 0],
            interval_accesses=5,
        )
        assert client.stat_file("b").nr_dirty == 1
        assert client.stat_file("a").nr_cached == 4
    totals = result.totals
    assert (totals.operations, totals.accesses) == (5, 9)
    assert (totals.stats.pages_missed, totals.stats.pages_hit) == (5, 4)
    assert (totals.read_stats.pages_missed, totals.read_stats.pages_hit) == (4, 4)
    # An interval ends at the end of the operation that fills it: 4 + 1, then 2 + 1 + 1.
    assert [(i.operations, i.accesses) for i in result.intervals] == [(2, 5), (3, 4)]


def test_the_async_client_replays(make_server: ServerFactory) -> None:
    """AsyncFoliodClient.replay sends the same call."""
    server = start(make_server, "fifo")
    keys = block_trace(seed=5, n=500)
    with client_of(server) as client:
        client.create_file("trace")
        client.truncate_file("trace", FILE_PAGES * PAGE)

    async def replay() -> ReplayResult:
        async with AsyncFoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=30) as client:
            return await client.replay("trace", [k * PAGE for k in keys])

    result = asyncio.run(replay())
    assert result.totals.stats.pages_missed == fifo_misses(keys, CAPACITY)
    assert result.intervals == ()


def _chunk(**fields: Any) -> pb.ReplayChunk:
    return pb.ReplayChunk(**fields)


GOOD = _chunk(names=["f"], offsets=[PAGE, 2 * PAGE])
# (label, chunks, code, words of the message)
BAD_STREAMS: list[tuple[str, list[pb.ReplayChunk], grpc.StatusCode, str]] = [
    ("empty stream", [], grpc.StatusCode.INVALID_ARGUMENT, "sent no chunk"),
    ("no names", [_chunk(offsets=[0])], grpc.StatusCode.INVALID_ARGUMENT, "names the files"),
    (
        "lengths",
        [GOOD, _chunk(offsets=[0, PAGE], lengths=[PAGE])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk 1: 1 lengths for 2 offsets",
    ),
    (
        "ops",
        [GOOD, _chunk(offsets=[0], ops=[pb.REPLAY_OP_READ] * 2)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "2 ops for 1 offsets",
    ),
    (
        "op value",
        [GOOD, _chunk(offsets=[0, 0], ops=[1, 7])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "ops[1] is 7",
    ),
    (
        "zero length",
        [GOOD, _chunk(offsets=[0], lengths=[0])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "lengths[0] is 0",
    ),
    (
        "long length",
        [GOOD, _chunk(offsets=[0], lengths=[(2 << 20) + 1])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "not 1..2097152 bytes",
    ),
    (
        "file index",
        [GOOD, _chunk(offsets=[0, 0], files=[0, 1])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "files[1] is 1, but the trace names 1 files",
    ),
    (
        "past eof",
        [GOOD, _chunk(offsets=[64 * PAGE])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "reaches byte",
    ),
    (
        "past eof by length",
        [GOOD, _chunk(offsets=[63 * PAGE], lengths=[PAGE + 1])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "reaches byte 262145",
    ),
    (
        "names again",
        [GOOD, _chunk(names=["f"], offsets=[0])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "first chunk only",
    ),
    ("no file", [_chunk(names=["f", "nope"], offsets=[0])], grpc.StatusCode.NOT_FOUND, "nope"),
    (
        "no machine",
        [_chunk(machine="nope", names=["f"], offsets=[0])],
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    ("bad name", [_chunk(names=["../x"], offsets=[0])], grpc.StatusCode.INVALID_ARGUMENT, ""),
]


@pytest.mark.parametrize(
    ("label", "chunks", "code", "words"), BAD_STREAMS, ids=[b[0] for b in BAD_STREAMS]
)
def test_a_bad_trace_is_refused_whole(
    make_server: ServerFactory,
    label: str,
    chunks: list[pb.ReplayChunk],
    code: grpc.StatusCode,
    words: str,
) -> None:
    """Each malformed stream ends with its status and message, and nothing of it runs (the
    good reads before the bad chunk included)."""
    server = start(make_server, "lru")
    channel, stub = connect(server)
    with channel, client_of(server) as client:
        client.create_file("f")
        client.truncate_file("f", 64 * PAGE)
        before = client.get_vmstat()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Replay(iter(chunks), timeout=10)
        assert caught.value.code() == code, label
        assert words in (caught.value.details() or "")
        assert client.stat_file("f").nr_cached == 0
        assert client.get_vmstat() == before


def test_a_trace_over_the_access_limit_is_refused(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than MAX_REPLAY_ACCESSES page accesses in one call: INVALID_ARGUMENT, nothing run."""
    monkeypatch.setattr(replay, "MAX_REPLAY_ACCESSES", 100)
    server = start(make_server, "lru")
    with client_of(server) as client:
        client.create_file("f")
        client.truncate_file("f", 64 * PAGE)
        with pytest.raises(InvalidArgument, match="exceeds 100 page accesses"):
            client.replay("f", [0] * 60, [2 * PAGE] * 60)
        assert client.stat_file("f").nr_cached == 0
        assert client.replay("f", [0] * 100).totals.accesses == 100


def test_the_client_raises_the_status(make_server: ServerFactory) -> None:
    """The clients map the statuses back to the error tree; columns of unequal length never
    leave the client."""
    server = start(make_server, "lru")
    with client_of(server) as client:
        client.create_file("f")
        client.truncate_file("f", 4 * PAGE)
        with pytest.raises(InvalidArgument, match="reaches byte"):
            client.replay("f", [0, 4 * PAGE])
        with pytest.raises(NotFound):
            client.replay("g", [0])
        with pytest.raises(ValueError, match="2 lengths for 1 offsets"):
            client.replay("f", [0], [1, 2])
        assert client.stat_file("f").nr_cached == 0
