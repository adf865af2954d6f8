"""Several iterations per scheduler round trip: long tasks ("ranks") that exchange statistics.

An iteration submitted as tasks pays a scheduler round trip (client -> scheduler -> workers
-> scheduler -> client: 13-16 ms on a 2-process cluster on this kind of machine), which is
most of an iteration of a small problem (Fashion-MNIST pixels, k = 10: 28 ms of compute).
A *round* instead runs one task per worker thread, each holding its share of the blocks for
several iterations; after every pass the ranks all-gather their per-block statistics (k x d
float64 per block) and each computes the same next centres from the same numbers in the same
order, so every rank, and the client afterwards, agree to the last bit.

The all-gather goes from worker to worker. On a ``tcp://`` cluster a rank sends its message
over a plain TCP connection of its own to each other worker that holds ranks of the round
(:class:`_Listener`: 0.08 ms for one float and 0.11 ms for 53 KB between 2 worker processes
here), where a thread of that worker files it in the ranks' mailboxes. Elsewhere (TLS and
other comms), when ``dkm.lloyd.round-sockets`` is off, or when a peer's port cannot be
reached (a firewall that lets only Dask's own ports through), the message goes to the
``dkm_allgather`` handler of the peer worker over Dask's comm (0.5-0.7 ms), and ranks of the
same worker hand it over in memory. The messages are pickles, as Dask's own are: the direct
connections trust the network as Dask's ``tcp://`` comm does.
Each rank reads its own mailbox on its worker. A rank that waits longer than
``dkm.lloyd.round-timeout`` for a peer (a worker died, a rank never started) raises
:class:`RoundFailed`; the driver then continues the fit task by task.
"""

from __future__ import annotations

import pickle
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass

import numpy as np
from distributed import WorkerPlugin

from dkm import config
from dkm._parallel import kernels

__all__ = [
    "Exchange",
    "Link",
    "Ranks",
    "RoundFailed",
    "allgather_rows",
    "combine_in_order",
    "plan_ranks",
    "run_round",
]


class RoundFailed(RuntimeError):
    """A round of rank tasks could not complete (a peer is gone or never started)."""


# The sender "rank" of the message that calls a round off: ranks waiting for their peers
# stop at once instead of holding their worker's thread until the timeout.
_ABORT = -1

_HANDLER = "dkm_allgather"
_PORT_HANDLER = "dkm_allgather_port"
_LOCK = threading.Lock()


def _mailbox(worker, name: str) -> queue.SimpleQueue:
    """The mailbox of the rank ``name`` on ``worker`` (made on first use: a peer's message
    may arrive before the rank starts)."""
    with _LOCK:
        boxes = worker.__dict__.setdefault("_dkm_mailboxes", {})
        if name not in boxes:
            boxes[name] = queue.SimpleQueue()
        return boxes[name]


def _drop_mailbox(worker, name: str) -> None:
    with _LOCK:
        worker.__dict__.get("_dkm_mailboxes", {}).pop(name, None)


def _install(dask_worker) -> None:
    """Give ``dask_worker`` the handlers that file a peer's messages in its mailboxes and
    that tell a peer the port of its :class:`_Listener` (started on the first ask)."""

    def receive(names: list, payload: bytes) -> None:
        for name in names:
            _mailbox(dask_worker, name).put(payload)

    def port() -> tuple | None:
        with _LOCK:  # started once (None for good where the comm is not plain TCP)
            if "_dkm_listener" not in dask_worker.__dict__:
                dask_worker.__dict__["_dkm_listener"] = _Listener.start(dask_worker)
            listener = dask_worker.__dict__["_dkm_listener"]
        return listener.address if listener else None

    dask_worker.handlers[_HANDLER] = receive
    dask_worker.handlers[_PORT_HANDLER] = port


# Seconds a rank waits for a peer worker to name its port, and to connect to it.
PORT_ASK_SECONDS = 10.0

# A frame on a direct connection: the mailbox names' and the payload's byte counts.
_FRAME = struct.Struct("<IQ")


class _Listener:
    """A worker's TCP server for the ranks' direct messages.

    Bound to the host of the worker's own ``tcp://`` address (127.0.0.1 on a local
    cluster), on a port the system picks. One thread serves every connection through a
    selector (a rank connects to every other worker of its round: a thread per connection
    would be hundreds on a large cluster) and files each frame's payload in the named
    mailboxes of this worker. It ends when the worker closes the server (plugin teardown)
    or the process exits.
    """

    def __init__(self, dask_worker, host: str):
        self.worker = dask_worker
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = socket.create_server((host, 0), family=family)
        self.server.setblocking(False)
        self.address = self.server.getsockname()[:2]
        self.closed = False
        threading.Thread(target=self._serve, name="dkm-allgather", daemon=True).start()

    @classmethod
    def start(cls, dask_worker) -> _Listener | None:
        """A listener for ``dask_worker``, or None when its comm is not plain TCP."""
        from distributed.comm import parse_address, parse_host_port

        scheme, loc = parse_address(dask_worker.address)
        if scheme != "tcp":
            return None
        try:
            return cls(dask_worker, parse_host_port(loc)[0])
        except OSError:
            return None

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.server, selectors.EVENT_READ)
            while not self.closed:
                try:  # the timeout only bounds how long a closed listener's thread lingers
                    events = sel.select(timeout=1.0)
                except (OSError, ValueError):  # the server closed under the selector
                    break
                for key, _ in events:
                    if key.fileobj is self.server:
                        self._accept(sel)
                    elif not self._read(key.fileobj, key.data):
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
            for key in list(sel.get_map().values()):
                key.fileobj.close()

    def _accept(self, sel) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:  # closed, or the peer gave up
            return
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, _Frames())

    def _read(self, conn: socket.socket, frames: _Frames) -> bool:
        """Take what ``conn`` has and file its whole frames. False once the connection is
        closed or broken."""
        try:
            got = conn.recv_into(frames.space())
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not got:
            return False
        for names, payload in frames.add(got):
            for name in names:
                _mailbox(self.worker, name).put(payload)
        return True

    def close(self) -> None:
        self.closed = True
        self.server.close()


class _Frames:
    """What one connection has sent, read into one growing buffer, cut into frames."""

    def __init__(self):
        self.buf = bytearray(1 << 16)
        self.have = 0

    def space(self) -> memoryview:
        """The free end of the buffer (grown to hold the frame being read)."""
        need = _FRAME.size
        if self.have >= _FRAME.size:
            n_names, n_payload = _FRAME.unpack_from(self.buf)
            need += n_names + n_payload
        if len(self.buf) < max(need, self.have + 4096):
            self.buf.extend(bytes(max(need, self.have + 4096) - len(self.buf)))
        return memoryview(self.buf)[self.have :]

    def add(self, got: int) -> list[tuple[list[str], bytes]]:
        """The frames completed by ``got`` more bytes, as ``(mailbox names, payload)``."""
        self.have += got
        out, at = [], 0
        view = memoryview(self.buf)
        while self.have - at >= _FRAME.size:
            n_names, n_payload = _FRAME.unpack_from(self.buf, at)
            start = at + _FRAME.size
            end = start + n_names + n_payload
            if self.have < end:
                break
            names = bytes(view[start : start + n_names]).decode().split("\n")
            out.append((names, bytes(view[start + n_names : end])))
            at = end
        if at:
            rest = self.have - at
            view.release()
            self.buf[:rest] = self.buf[at : self.have]
            self.have = rest
        else:
            view.release()
        return out


class _AllgatherPlugin(WorkerPlugin):
    """Installs the handler on every worker, those that join later included."""

    name = "dkm-allgather"

    def setup(self, worker) -> None:
        _install(worker)

    def teardown(self, worker) -> None:
        listener = worker.__dict__.pop("_dkm_listener", None)
        if listener is not None:
            listener.close()


def _ensure_handlers(client) -> None:
    """Register :class:`_AllgatherPlugin` once per client (the scheduler keeps it)."""
    if getattr(client, "_dkm_allgather", False):
        return
    client.register_plugin(_AllgatherPlugin(), name=_AllgatherPlugin.name)
    client._dkm_allgather = True


@dataclass(frozen=True)
class Link:
    """How the ranks of a round reach each other.

    ``workers``: every rank's worker address, by rank. ``sockets``: ranks on different
    workers send over direct TCP connections where the cluster's comm is plain TCP
    (``dkm.lloyd.round-sockets``).
    """

    workers: tuple[str, ...]
    sockets: bool = True


class Exchange:
    """All-gather among the ranks of one round, from worker to worker.

    Parameters
    ----------
    name : str
        Unique per round: the mailboxes are ``<name>-<rank>``.
    rank : int
        This rank.
    link : Link
        Every rank's worker (this rank's own included), and whether to send over direct
        connections.
    timeout : float
        Seconds to wait for a peer's message before :class:`RoundFailed`.
    """

    def __init__(self, name: str, rank: int, link: Link, timeout: float):
        from distributed import get_worker

        workers = link.workers
        self.name, self.rank, self.n, self.timeout = name, rank, len(workers), timeout
        self.sockets = link.sockets
        self.worker = get_worker()
        self.seq = 0
        self.pending: dict[tuple[int, int], object] = {}
        self.inbox = _mailbox(self.worker, f"{name}-{rank}")
        here = self.worker.address
        self.local = [f"{name}-{r}" for r, a in enumerate(workers) if a == here and r != rank]
        self.remote: dict[str, list[str]] = {}
        self.comms: dict = {}  # Dask comms to peer workers, made on the first send
        self.direct: dict[str, socket.socket | None] = {}  # None: that peer goes by comm
        for r, a in enumerate(workers):
            if a != here:
                self.remote.setdefault(a, []).append(f"{name}-{r}")
        # The mailbox names of a direct frame to each peer worker, as sent.
        self.boxes = {a: "\n".join(names).encode() for a, names in self.remote.items()}

    def _send(self, payload: bytes) -> None:
        for box in self.local:
            _mailbox(self.worker, box).put(payload)
        by_comm = []
        for addr, boxes in self.boxes.items():
            conn = self._direct(addr)
            if conn is None:
                by_comm.append(addr)
                continue
            try:
                conn.sendall(_FRAME.pack(len(boxes), len(payload)) + boxes)
                conn.sendall(payload)
            except OSError as err:
                raise RoundFailed(f"rank {self.rank} could not reach {addr}: {err}") from err
        if by_comm:
            self._on_loop(self._send_remote, payload, by_comm)

    def _direct(self, addr: str) -> socket.socket | None:
        """The direct connection to the worker ``addr`` (made on the first send), or None
        when messages to it go by Dask's comm."""
        if addr in self.direct:
            return self.direct[addr]
        conn = None
        if self.sockets:
            box: list = []
            # A peer that cannot answer this within a few seconds is gone or stuck: the
            # round fails now rather than after Dask's connect timeout (30 s).
            self._on_loop(self._ask_port, addr, box, timeout=min(PORT_ASK_SECONDS, self.timeout))
            if box[0] is not None:
                try:
                    # A port a firewall drops would hang to the round's timeout: a few seconds
                    # at most, then Dask's comm, which reaches that worker.
                    conn = socket.create_connection(
                        tuple(box[0]), timeout=min(PORT_ASK_SECONDS, self.timeout)
                    )
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.settimeout(self.timeout)
                except OSError:
                    conn = None
        self.direct[addr] = conn
        return conn

    async def _ask_port(self, addr: str, box: list) -> None:
        box.append(await self.worker.rpc(addr).dkm_allgather_port())

    async def _send_remote(self, payload: bytes, addrs: list) -> None:
        """One message per peer worker in ``addrs``, on a Dask connection kept for the round
        and without a reply: the write returns once the bytes are on their way."""
        from distributed.comm import connect

        for addr in addrs:
            comm = self.comms.get(addr)
            if comm is None:
                comm = self.comms[addr] = await connect(addr, timeout=self.timeout)
            names = self.remote[addr]
            await comm.write({"op": _HANDLER, "names": names, "payload": payload, "reply": False})

    def _on_loop(self, fn, *args, timeout: float | None = None) -> None:
        from distributed.utils import sync

        try:
            sync(self.worker.loop, fn, *args, callback_timeout=timeout or self.timeout)
        except Exception as err:  # the peer's worker is gone or not answering
            raise RoundFailed(f"rank {self.rank} could not reach a peer: {err}") from err

    def allgather(self, obj) -> list:
        """Every rank's ``obj``, indexed by rank (this rank's own is ``obj`` itself)."""
        return self.collect(self.post(obj), obj)

    def post(self, obj) -> int:
        """Send ``obj`` to the other ranks; :meth:`collect` with the returned number gathers
        theirs. Work done between the two overlaps the exchange."""
        seq = self.seq
        self.seq += 1
        if self.n > 1:
            self._send(pickle.dumps((self.rank, seq, obj), protocol=pickle.HIGHEST_PROTOCOL))
        return seq

    def collect(self, seq: int, obj) -> list:
        """Every rank's message of exchange ``seq`` (:meth:`post`), indexed by rank; this
        rank's own is ``obj``."""
        if self.n == 1:
            return [obj]
        out: list = [None] * self.n
        out[self.rank] = obj
        missing = {r for r in range(self.n) if r != self.rank}
        for r in list(missing):
            if (seq, r) in self.pending:
                out[r] = self.pending.pop((seq, r))
                missing.discard(r)
        deadline = time.monotonic() + self.timeout
        while missing:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise queue.Empty
                raw = self.inbox.get(timeout=left)
            except queue.Empty as err:
                raise RoundFailed(
                    f"rank {self.rank} waited {self.timeout:.0f} s for rank(s) "
                    f"{sorted(missing)} (dkm.lloyd.round-timeout)"
                ) from err
            r, s, value = pickle.loads(raw)
            if r == _ABORT:
                raise RoundFailed(f"rank {self.rank}: the round was called off ({value})")
            if s == seq:
                out[r] = value
                missing.discard(r)
            else:  # a faster peer's next exchange
                self.pending[(s, r)] = value
        return out

    def close(self) -> None:
        _drop_mailbox(self.worker, f"{self.name}-{self.rank}")
        for conn in self.direct.values():
            if conn is not None:
                conn.close()
        if self.comms:

            async def close_all():
                for comm in self.comms.values():
                    comm.abort()

            try:
                self._on_loop(close_all)
            except RoundFailed:  # pragma: no cover - the worker is closing
                pass


def allgather_rows(exchange: Exchange, held: Sequence[tuple], rows, d: int) -> np.ndarray:
    """The global ``rows``, in their order as float64, on every rank: each rank sends the
    ones its blocks hold (``held``: ``(block, first row, one past its last row)`` each)."""
    rows = np.asarray(rows, dtype=np.int64)
    mine = []
    for block, lo, hi in held:
        pos = np.flatnonzero((rows >= lo) & (rows < hi))
        if len(pos):
            mine.append((pos, kernels.take_rows(block, rows[pos] - lo)))
    out = np.empty((len(rows), d), dtype=np.float64)
    for parts in exchange.allgather(mine):
        for pos, part in parts:
            out[pos] = part
    return out


@dataclass(frozen=True)
class Ranks:
    """Which blocks each rank holds and on which worker it runs.

    ``blocks[r]`` lists block indices in increasing order; every block is in one rank.
    """

    workers: tuple[str, ...]
    blocks: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return len(self.workers)


def plan_ranks(backend, handles: Sequence) -> Ranks | None:
    """One rank per worker thread that holds blocks, given the blocks where they are.

    ``backend`` is a :class:`~dkm._parallel.backend.DistributedBackend`. Returns None when
    a block is not in any worker's memory (ranks run where their blocks are; a block in
    flight or lost is left to the task-by-task path).
    """
    backend.wait(list(handles))  # blocks being centered are not anywhere yet
    info = backend.workers()
    who = backend.client.who_has(list(handles))
    by_worker: dict[str, list[int]] = {}
    for i, f in enumerate(handles):
        held = sorted(a for a in who.get(f.key, ()) if a in info)
        if not held:
            return None
        by_worker.setdefault(held[0], []).append(i)
    workers, blocks = [], []
    for addr in sorted(by_worker):
        mine = by_worker[addr]
        t = max(1, min(int(info[addr].get("nthreads", 1) or 1), len(mine)))
        for j in range(t):
            workers.append(addr)
            blocks.append(tuple(mine[j::t]))
    return Ranks(tuple(workers), tuple(blocks))


def combine_in_order(parts: list, combine: Callable, every: int | None):
    """``parts`` combined as :meth:`~dkm._parallel.backend.Backend.reduce` combines them:
    all at once (``every`` None, the client's reduction) or in a tree of fan-in ``every``,
    so that a rank's float sums are the client's to the last bit."""
    if every is None:
        return combine(*parts)
    while len(parts) > 1:
        parts = [combine(*parts[i : i + every]) for i in range(0, len(parts), every)]
    return parts[0]


def run_round(
    backend,
    ranks: Ranks,
    fn: Callable,
    per_rank: Callable[[int], tuple],
    name: str,
    timeout: float,
) -> list:
    """Run ``fn(name, rank, link, timeout, *per_rank(rank))`` as one task per rank
    (``link``: the :class:`Link` of the round, for its :class:`Exchange`).

    Each task is pinned to its rank's worker. Returns the rank futures (their results stay
    on the workers) once all finished. Raises :class:`RoundFailed` when a rank erred, a
    rank's worker left, or the others did not finish within ``timeout`` of the first; the
    futures are then cancelled.
    """
    from distributed import wait

    client = backend.client
    if not set(ranks.workers) <= set(backend.workers()):
        raise RoundFailed(f"a worker of {name} left before the round")
    _ensure_handlers(client)
    link = Link(ranks.workers, bool(config.get("lloyd.round-sockets")))
    futures = [
        client.submit(
            fn,
            name,
            r,
            link,
            timeout,
            *per_rank(r),
            key=f"{name}-{r}",
            workers=[ranks.workers[r]],
            allow_other_workers=False,
            pure=False,
        )
        for r in range(ranks.n)
    ]
    first_done = None
    try:
        while True:
            try:
                wait(futures, timeout=0.5)
            except TimeoutError as err:
                err.__traceback__ = None
            except CancelledError as err:  # its blocks were lost: the task path says how
                raise RoundFailed(f"a rank of {name} was cancelled: {err}") from None
            states = [f.status for f in futures]
            if any(s in ("error", "cancelled", "lost") for s in states):
                bad = next(f for f in futures if f.status in ("error", "cancelled", "lost"))
                reason = bad.exception() if bad.status == "error" else bad.status
                raise RoundFailed(f"a rank of {name} ended with: {reason}")
            if all(s == "finished" for s in states):
                return futures
            now = time.monotonic()
            if any(s == "finished" for s in states):
                first_done = first_done or now
                if now - first_done > timeout:
                    raise RoundFailed(f"ranks of {name} did not finish with the others")
            alive = set(backend.workers())
            if not set(ranks.workers) <= alive:
                raise RoundFailed(f"a worker of {name} left during the round")
    except BaseException as err:
        client.cancel(futures)
        _call_off(backend, ranks, name, str(err))
        raise


def _call_off(backend, ranks: Ranks, name: str, why: str) -> None:
    """Tell every rank of a failed round to stop waiting (best effort)."""
    client = backend.client
    if client.status != "running":  # the scheduler is gone, and the ranks with it
        return
    # Only the workers still there: a broadcast to one that left waits for its timeout.
    alive = sorted(set(ranks.workers) & set(backend.workers()))
    try:
        client.run(_abort, name, ranks.n, why, workers=alive, on_error="ignore")
    except Exception:  # pragma: no cover - the cluster is going away
        pass


def _abort(name: str, n: int, why: str, dask_worker=None) -> None:
    """File the call-off in the mailboxes of the round's ranks that run on this worker."""
    payload = pickle.dumps((_ABORT, -1, why), protocol=pickle.HIGHEST_PROTOCOL)
    for r in range(n):
        # Made if missing: a rank that is starting reads it (one that never starts leaves
        # a few bytes behind).
        _mailbox(dask_worker, f"{name}-{r}").put(payload)
