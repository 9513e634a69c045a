"""The Replay RPC: a trace replayed through gRPC, in order, gets the exact miss counts of
textbook LRU, FIFO and CLOCK written here; bad chunks are refused whole, changing nothing."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable

import grpc
import pytest

from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import FoliodClient, InvalidArgument
from foliodclient._calls import replay_chunks
from tests.conftest import ServerFactory

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
    return FoliodClient(f"127.0.0.1:{server.grpc_port}", timeout=60)


@pytest.mark.parametrize("policy", sorted(REFERENCES))
def test_replay_gets_the_textbook_miss_counts(make_server: ServerFactory, policy: str) -> None:
    keys = block_trace()
    server = start(make_server, policy)
    with client_of(server) as client:
        client.create_file("trace")
        client.truncate_file("trace", FILE_PAGES * PAGE)
        # Small chunks: the order must survive chunking.
        chunks = list(client_replay_chunks(keys))
        assert len(chunks) > 3
        result = client.replay("trace", [k * PAGE for k in keys], interval_accesses=1000)
    expected = REFERENCES[policy](keys, CAPACITY)
    totals = result.totals
    assert totals.stats.pages_missed == expected
    assert totals.stats.pages_hit == len(keys) - expected
    assert totals.stats.pages_readahead == 0
    assert (totals.operations, totals.accesses) == (len(keys), len(keys))
    assert totals.evictions == expected - CAPACITY
    assert totals.stats.device_seconds > 0
    # The series adds up to the totals, 1000 accesses an interval.
    assert [i.accesses for i in result.intervals] == [1000] * 6
    assert sum(i.stats.pages_missed for i in result.intervals) == expected
    assert sum(i.evictions for i in result.intervals) == totals.evictions
    assert sum(i.operations for i in result.intervals) == len(keys)


def client_replay_chunks(keys: list[int]) -> list[pb.ReplayChunk]:
    return list(replay_chunks("trace", [k * PAGE for k in keys], chunk_ops=1000))


def test_multi_page_reads_and_writes_run_in_order(make_server: ServerFactory) -> None:
    server = start(make_server, "lru")
    with client_of(server) as client:
        client.create_file("f")
        client.truncate_file("f", 64 * PAGE)
        # Read pages 0..3 (4 misses), write page 10 (a miss), read 2..3 and 10 (3 hits).
        result = client.replay(
            "f",
            [0, 10 * PAGE, 2 * PAGE, 10 * PAGE + 100],
            [4 * PAGE, 100, 2 * PAGE, 1],
            [False, True, False, False],
        )
        stat = client.stat_file("f")
    totals = result.totals
    assert (totals.operations, totals.accesses) == (4, 8)
    assert (totals.stats.pages_missed, totals.stats.pages_hit) == (5, 3)
    assert stat.nr_dirty == 1


BAD_CHUNKS: list[tuple[str, list[pb.ReplayChunk]]] = [
    ("no name", [pb.ReplayChunk(offsets=[0])]),
    ("lengths", [pb.ReplayChunk(name="f", offsets=[0, PAGE], lengths=[PAGE])]),
    ("ops", [pb.ReplayChunk(name="f", offsets=[0], ops=[pb.REPLAY_OP_READ] * 2)]),
    ("op value", [pb.ReplayChunk(name="f", offsets=[0], ops=[7])]),  # type: ignore[list-item]
    ("zero length", [pb.ReplayChunk(name="f", offsets=[0], lengths=[0])]),
    ("long length", [pb.ReplayChunk(name="f", offsets=[0], lengths=[(2 << 20) + 1])]),
    ("past eof", [pb.ReplayChunk(name="f", offsets=[0]), pb.ReplayChunk(offsets=[64 * PAGE])]),
    ("name again", [pb.ReplayChunk(name="f", offsets=[0]), pb.ReplayChunk(name="f")]),
    ("no file", [pb.ReplayChunk(name="nope", offsets=[0])]),
    ("empty stream", []),
]


@pytest.mark.parametrize(("label", "chunks"), BAD_CHUNKS, ids=[b[0] for b in BAD_CHUNKS])
def test_a_bad_trace_is_refused_whole(
    make_server: ServerFactory, label: str, chunks: list[pb.ReplayChunk]
) -> None:
    server = start(make_server, "lru")
    with client_of(server) as client:
        client.create_file("f")
        client.truncate_file("f", 64 * PAGE)
        before = client.get_vmstat()
        # Every stream but the empty one opens with good reads: none of them may run.
        stream = [pb.ReplayChunk(name="f", offsets=[PAGE, 2 * PAGE])] if chunks else []
        if chunks and chunks[0].name == "f":
            stream = [pb.ReplayChunk(name="f", offsets=[PAGE, 2 * PAGE]), *chunks[1:]]
            first = pb.ReplayChunk()
            first.CopyFrom(chunks[0])
            first.name = ""
            stream.append(first)
        else:
            stream = chunks
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            with pytest.raises(grpc.RpcError) as caught:
                pb_stub(channel).Replay(iter(stream), timeout=10)
        finally:
            channel.close()
        expected = grpc.StatusCode.NOT_FOUND if label == "no file" else None
        assert caught.value.code() == (expected or grpc.StatusCode.INVALID_ARGUMENT), label
        assert client.stat_file("f").nr_cached == 0
        assert client.get_vmstat() == before


def pb_stub(channel: grpc.Channel) -> foliod_pb2_grpc.FoliodStub:
    return foliod_pb2_grpc.FoliodStub(channel)


def test_the_client_raises_the_status(make_server: ServerFactory) -> None:
    server = start(make_server, "lru")
    with client_of(server) as client:
        client.create_file("f")
        client.truncate_file("f", 4 * PAGE)
        with pytest.raises(InvalidArgument, match="reaches byte"):
            client.replay("f", [0, 4 * PAGE])
        assert client.stat_file("f").nr_cached == 0
