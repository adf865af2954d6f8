"""Getting a Dask client: a machine-sized LocalCluster by default, or a remote scheduler.

The address comes from, in order: the caller (``--scheduler``), the ``DKM_SCHEDULER``
environment variable, the job file's ``cluster.address``, then dask's own
``scheduler-address`` config (``DASK_SCHEDULER_ADDRESS``). ``tls://`` addresses use dask's
security config (``distributed.comm.tls.*``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from dkm import config

__all__ = [
    "SchedulerLost",
    "SchedulerUnreachable",
    "check_interrupted",
    "check_scheduler",
    "connect",
    "default_cluster_shape",
    "resolve_address",
]

log = logging.getLogger("dkm")


class SchedulerUnreachable(ConnectionError):
    """No Dask scheduler answered at the given address in time."""


class SchedulerLost(ConnectionError):
    """The scheduler went away while dkm was using it."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_cluster_shape(cores: int | None = None) -> tuple[int, int]:
    """``(n_workers, threads_per_worker)`` with ``workers * threads == cores``.

    Up to four cores get one single-threaded process each (real parallelism for the Python
    parts of a task, a memory limit per process); beyond that, processes of about
    ``sqrt(cores)`` threads keep the process count moderate.
    """
    cores = cores or _cores()
    if cores <= 4:
        return cores, 1
    threads = max(1, int(math.sqrt(cores)))
    while cores % threads:
        threads -= 1
    return cores // threads, threads


def resolve_address(address: str | None = None, job_address: str | None = None) -> str | None:
    """The scheduler address to use, or None for a new LocalCluster.

    Precedence: ``address`` (the ``--scheduler`` flag), ``$DKM_SCHEDULER`` (an empty value
    counts as unset), ``job_address`` (a job's ``cluster.address``), dask's
    ``scheduler-address`` config.

    Raises
    ------
    SchedulerUnreachable
        ``address`` is given but empty.
    """
    if address is not None and not address.strip():
        raise SchedulerUnreachable("--scheduler is empty; give a tcp:// or tls:// address")
    return (
        address
        or os.environ.get("DKM_SCHEDULER")
        or job_address
        or dask.config.get("scheduler-address", None)
    )


@contextmanager
def connect(
    address: str | None = None,
    *,
    job_address: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = "auto",
    dashboard_address: str | None = "127.0.0.1:8787",
    timeout: float | None = None,
) -> Iterator[Client]:
    """A client for the duration of a ``with`` block.

    Parameters
    ----------
    address : str, optional
        ``tcp://host:port`` or ``tls://host:port``; see :func:`resolve_address`.
    job_address : str, optional
        A job file's ``cluster.address`` (below ``$DKM_SCHEDULER`` in precedence).
    n_workers, threads_per_worker : int, optional
        Shape of the LocalCluster started when there is no address
        (default :func:`default_cluster_shape`).
    memory_limit : str or int, default "auto"
        Per-worker memory limit of the LocalCluster.
    dashboard_address : str, optional
        Where the LocalCluster serves its dashboard (another port is taken if busy); None
        turns it off. Everything binds to 127.0.0.1: a local cluster is not a network service.
    timeout : float, optional
        Seconds to wait for a remote scheduler before giving up (default
        ``dkm.scheduler.timeout``, 10 s).

    Raises
    ------
    SchedulerUnreachable
        A remote address did not answer within ``timeout``.
    """
    address = resolve_address(address, job_address)
    timeout = config.get_seconds("scheduler.timeout") if timeout is None else timeout
    if address and address.startswith("tls://"):
        _check_tls_config(address)
    with _ctrl_c_handled():
        if address:
            check_scheduler(address, timeout)
            try:
                client = Client(address, timeout=timeout)
            except OSError as err:
                raise SchedulerUnreachable(
                    f"no Dask scheduler answered at {address} within {timeout:g} s ({err})"
                ) from err
            log.info("connected to %s; dashboard: %s", address, client.dashboard_link)
            with _closing(client):
                yield client
            return

        workers, threads = default_cluster_shape()
        if n_workers is not None or threads_per_worker is not None:
            cores = workers * threads
            workers = n_workers or max(1, cores // (threads_per_worker or 1))
            threads = threads_per_worker or max(1, cores // workers)
        # The worker processes inherit an ignored SIGINT: Ctrl-C in a terminal reaches the
        # whole process group, and only this process should react (by closing the cluster).
        # Nanny workers pin OMP/MKL/OPENBLAS threads to 1, so one BLAS thread runs per task.
        with _sigint_ignored():
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                host="127.0.0.1",
                memory_limit=memory_limit,
                dashboard_address=dashboard_address,
                silence_logs=logging.WARNING,
            )
            client = Client(cluster)
            # A worker the nanny restarts later is spawned from this process, whose SIGINT is
            # handled by then: the plugin ignores it in every worker, restarted ones included.
            client.register_plugin(_IgnoreSigint(), name="dkm-ignore-sigint")
        log.info(
            "started a LocalCluster with %d worker(s) x %d thread(s); dashboard: %s",
            workers,
            threads,
            client.dashboard_link,
        )
        with _closing(client, cluster):
            yield client


# ----------------------------------------------------------------------------- probing


async def _identity(address: str, timeout: float) -> Any:
    from distributed.comm import connect as comm_connect
    from distributed.security import Security

    args = Security().get_connection_args("client")
    comm = await asyncio.wait_for(comm_connect(address, timeout=timeout, **args), timeout)
    try:
        await asyncio.wait_for(comm.write({"op": "identity"}), timeout)
        return await asyncio.wait_for(comm.read(), timeout)
    finally:
        comm.abort()


def _check_tls_config(address: str) -> None:
    """dask's TLS settings must exist before a tls:// address can be tried."""
    if not dask.config.get("distributed.comm.tls.ca-file", None):
        raise SchedulerUnreachable(
            f"{address} is a TLS address but dask has no TLS configuration: set "
            "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and .client.key "
            "(e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE=...)"
        )
    for key in ("ca-file", "client.cert", "client.key"):
        value = dask.config.get(f"distributed.comm.tls.{key}", None)
        if value and not os.path.isfile(value):
            env = "DASK_DISTRIBUTED__COMM__TLS__" + key.upper().replace(".", "__").replace("-", "_")
            raise SchedulerUnreachable(
                f"distributed.comm.tls.{key} is {value!r}, which is not a file; fix that "
                f"setting ({env})"
            )


def _check_address(address: str) -> None:
    from distributed.comm import parse_address

    try:
        scheme, _ = parse_address(address, strict=True)
        if scheme in ("tcp", "tls"):
            from distributed.comm import get_address_host_port

            get_address_host_port(address)
    except (ValueError, TypeError):
        raise SchedulerUnreachable(
            f"{address!r} is not a scheduler address (expected tcp://HOST:PORT or tls://HOST:PORT)"
        ) from None
    if scheme not in ("tcp", "tls", "inproc", "ws", "wss", "ucx"):
        raise SchedulerUnreachable(
            f"{address!r}: {scheme}:// is not a Dask transport (expected tcp:// or tls://)"
        )


def _check_port(address: str, timeout: float) -> None:
    """Whether anything listens at a tcp:// or tls:// address (TCP only, no protocol)."""
    from distributed.comm import get_address_host_port

    try:
        host, port = get_address_host_port(address)
    except ValueError:  # inproc:// and other transports: nothing to knock on
        return
    if not 0 < port < 65536:
        raise SchedulerUnreachable(f"{address}: port {port} is out of range (1-65535)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(
                (host, port), timeout=max(0.1, deadline - time.monotonic())
            ).close()
            return
        except OSError as err:
            # A scheduler that is still starting refuses for a moment: retry until the timeout.
            if time.monotonic() >= deadline:
                raise SchedulerUnreachable(
                    f"no Dask scheduler answered at {address} within {timeout:g} s ({err})"
                ) from None
            time.sleep(0.2)


def check_scheduler(address: str, timeout: float) -> None:
    """Make sure a Dask scheduler answers at ``address`` within ``timeout`` seconds.

    ``distributed.Client`` waits without bound on a socket that accepts connections but never
    speaks the Dask protocol (a dashboard or any other HTTP port, a silent socket), so dkm asks
    the scheduler who it is first, with every step bounded.

    Raises
    ------
    SchedulerUnreachable
        Nothing answered, something else answered, or something that is not a scheduler.
    """
    _check_address(address)
    _check_port(address, timeout)
    # A fresh event loop in a helper thread: this also works inside a running loop (Jupyter).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dkm-probe") as pool:
        future = pool.submit(asyncio.run, _identity(address, timeout))
        try:
            reply = future.result(timeout + 5)
        except TimeoutError:
            raise SchedulerUnreachable(
                f"{address} accepts connections but did not answer the Dask handshake within "
                f"{timeout:g} s: it is not a Dask scheduler (a dashboard or another service's "
                "port?); give the scheduler's address, by default port 8786"
            ) from None
        except OSError as err:
            raise SchedulerUnreachable(
                f"no Dask scheduler answered at {address} within {timeout:g} s ({err})"
            ) from None
        except Exception as err:  # garbage that fails to deserialise, a reset connection...
            raise SchedulerUnreachable(
                f"{address} does not speak the Dask protocol ({type(err).__name__}: {err}); "
                "give the scheduler's address, by default port 8786"
            ) from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise SchedulerUnreachable(
            f"{address} is a Dask {kind or 'peer'}, not a scheduler; give the scheduler's address"
        )


# ----------------------------------------------------------------------------- Ctrl-C

_interrupted = threading.Event()


def check_interrupted() -> None:
    """Raise :class:`KeyboardInterrupt` if Ctrl-C arrived while it could not be raised.

    Python drops an exception raised inside a ``__del__`` (distributed releases futures
    there), so the signal handler also sets a flag that long loops check between steps.
    """
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def _unraisable(hook):
    def quiet(unraisable) -> None:
        # A Ctrl-C swallowed by a __del__ is not an error to print: the flag has it.
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            hook(unraisable)

    return quiet


class _DropAllExit(logging.Filter):
    """Drops the noise of gathers that Ctrl-C cut short: asyncio's "Task exception was never
    retrieved" for distributed's ``AllExit``, and the NameError distributed's ``sync`` logs
    when Ctrl-C lands before its future exists; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        if exc is not None and exc.__name__ == "AllExit":
            return False
        return not (exc is NameError and "sync.<locals>.cancel" in record.getMessage())


class _IgnoreSigint(WorkerPlugin):
    """Worker plugin: SIGINT is the client's to handle (see :func:`connect`)."""

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextmanager
def _ctrl_c_handled() -> Iterator[None]:
    """While a cluster is up: Ctrl-C raises KeyboardInterrupt here (and is remembered), and
    the noise of an interrupted client is kept off the terminal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    old_handler = signal.signal(signal.SIGINT, _on_sigint)
    old_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(old_hook)
    drop = _DropAllExit()
    for name in ("asyncio", "tornado.application"):
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_handler)
        sys.unraisablehook = old_hook
        for name in ("asyncio", "tornado.application"):
            logging.getLogger(name).removeFilter(drop)


def _silence_distributed() -> None:
    # distributed's logging config gives some children (distributed.client, ...) levels of
    # their own, so the parent's level alone does not reach them.
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith("distributed")]
    for name in ["distributed", *names]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextmanager
def _closing(client: Client, cluster: LocalCluster | None = None) -> Iterator[None]:
    """Close the client (and a cluster dkm started) however the block ends; after Ctrl-C or
    a lost scheduler, quietly: distributed would otherwise log the work and the connection it
    lost, as tracebacks."""
    interrupted = False
    try:
        yield
    except (KeyboardInterrupt, SchedulerLost):
        interrupted = True
        raise
    finally:
        with _sigint_ignored():  # a second Ctrl-C must not cut the teardown short
            if interrupted or _interrupted.is_set():
                _silence_distributed()
                if cluster is not None:  # never silence the workers of someone else's cluster
                    with contextlib.suppress(Exception):
                        client.run(_silence_distributed)
            with contextlib.suppress(Exception):
                client.close(timeout=10)
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close(timeout=10)
