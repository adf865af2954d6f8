"""The ranks' all-gather between real worker processes: direct connections and Dask's comm."""

from __future__ import annotations

import time

import dask
import numpy as np
import pytest

from dkm._parallel import spmd
from dkm._parallel.backend import get_backend

pytestmark = pytest.mark.slow


def _exchanges(name, rank, link, timeout, sizes):
    """Every size's array from every rank, and how each peer worker was reached."""
    exchange = spmd.Exchange(name, rank, link, timeout)
    try:
        got = []
        for i, size in enumerate(sizes):
            mine = np.full(size, 10 * rank + i, dtype=np.float64)
            got.append([float(a.sum()) for a in exchange.allgather(mine)])
        how = {addr: conn is not None for addr, conn in exchange.direct.items()}
        return got, how, sorted(exchange.comms)
    finally:
        exchange.close()


def _round(client, name, sizes):
    be = get_backend(client)
    workers = tuple(sorted(be.workers()))
    ranks = spmd.Ranks(workers, tuple((i,) for i in range(len(workers))))
    futures = spmd.run_round(be, ranks, _exchanges, lambda r: (sizes,), name, 30.0)
    return workers, client.gather(futures)


# Both ranks send 8 MB at once: more than the sockets' buffers, so a sender whose peer did
# not drain its connection while it sends too would wait forever.
SIZES = (1, 6656, 1, 2**20, 3)


def _expected(sizes, n):
    return [[float(size * (10 * r + i)) for r in range(n)] for i, size in enumerate(sizes)]


def test_ranks_of_two_worker_processes_exchange_over_their_own_connections(client):
    workers, results = _round(client, "spmd-direct", SIZES)
    for rank, (got, how, comms) in enumerate(results):
        assert got == _expected(SIZES, 2)
        peer = workers[1 - rank]
        assert how == {peer: True} and comms == []


def test_with_round_sockets_off_they_go_through_dasks_comm(client):
    with dask.config.set({"dkm.lloyd.round-sockets": False}):
        workers, results = _round(client, "spmd-comm", SIZES)
    for rank, (got, how, comms) in enumerate(results):
        assert got == _expected(SIZES, 2)
        assert how == {workers[1 - rank]: False} and comms == [workers[1 - rank]]


def _unreachable_port(port, dask_worker=None):
    """Make this worker name a port nothing listens on (as behind a firewall)."""
    dask_worker.handlers[spmd._PORT_HANDLER] = lambda: ("127.0.0.1", port)


def test_a_peer_whose_port_cannot_be_reached_is_sent_to_through_dasks_comm(
    process_cluster, closed_port
):
    from distributed import Client

    # A client of its own: its plugin registration reinstalls the handlers afterwards.
    with Client(process_cluster) as c:
        spmd._ensure_handlers(c)
        workers = tuple(sorted(get_backend(c).workers()))
        c.run(_unreachable_port, closed_port, workers=[workers[1]])
        try:
            _, results = _round(c, "spmd-fallback", SIZES)
        finally:
            c.run(spmd._install)
    (got0, how0, comms0), (got1, how1, comms1) = results
    assert got0 == got1 == _expected(SIZES, 2)
    assert how0 == {workers[1]: False} and comms0 == [workers[1]]
    assert how1 == {workers[0]: True} and comms1 == []


def _silent_port(dask_worker=None):
    """Make this worker take a minute to name its port (a stuck or vanishing peer)."""
    import asyncio

    async def port():
        await asyncio.sleep(60)

    dask_worker.handlers[spmd._PORT_HANDLER] = port


def test_a_peer_that_does_not_name_its_port_fails_the_round_in_seconds(process_cluster):
    """Not after Dask's 30 s connect timeout, nor the round's own timeout: the fit goes on
    task by task sooner."""
    from distributed import Client

    with Client(process_cluster) as c:
        spmd._ensure_handlers(c)
        be = get_backend(c)
        workers = tuple(sorted(be.workers()))
        c.run(_silent_port, workers=[workers[1]])
        ranks = spmd.Ranks(workers, ((0,), (1,)))
        t0 = time.monotonic()
        try:
            with pytest.raises(spmd.RoundFailed, match="could not reach a peer"):
                spmd.run_round(be, ranks, _exchanges, lambda r: (SIZES,), "spmd-silent", 90.0)
        finally:
            c.run(spmd._install)
        assert time.monotonic() - t0 < spmd.PORT_ASK_SECONDS + 15


def test_frames_come_out_whole_however_the_bytes_arrive():
    """A connection's bytes cut anywhere (one byte, mid-header, several frames at once)
    give back each frame once, in order."""
    rng = np.random.default_rng(0)
    sent = [(["r-0"], b""), (["r-1", "r-2"], bytes(range(256)) * 40), (["r-3"], b"x" * 70_001)]
    stream = b"".join(
        spmd._FRAME.pack(len("\n".join(n).encode()), len(p)) + "\n".join(n).encode() + p
        for n, p in sent * 3
    )
    frames, got, at = spmd._Frames(), [], 0
    while at < len(stream):
        space = frames.space()
        k = min(len(space), int(rng.integers(1, 9000)), len(stream) - at)
        space[:k] = stream[at : at + k]
        space.release()
        got += frames.add(k)
        at += k
    assert got == sent * 3
    assert frames.have == 0
    several = b"".join(spmd._FRAME.pack(3, 1) + b"r-%d" % i + b"%d" % i for i in range(3))
    space = frames.space()
    space[: len(several)] = several
    space.release()
    assert frames.add(len(several)) == [([f"r-{i}"], b"%d" % i) for i in range(3)]
