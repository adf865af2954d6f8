"""Getting a Dask client: cluster shape, remote schedulers, the DKM_SCHEDULER variable.

Pins: ``default_cluster_shape`` always multiplies out to the core count; ``connect(address)``
reaches a scheduler and worker started as separate ``dask scheduler`` / ``dask worker``
processes and computes through them; a closed port is ``SchedulerUnreachable`` within the
timeout; the address comes from the argument, then ``DKM_SCHEDULER``, then dask's config; with
no address a machine-sized LocalCluster whose workers run BLAS single-threaded is started.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import socketserver
import threading
import time

import dask
import pytest

from dkm.runtime import (
    SchedulerUnreachable,
    check_scheduler,
    connect,
    default_cluster_shape,
    resolve_address,
)


@pytest.mark.parametrize("cores", range(1, 65))
def test_default_cluster_shape_multiplies_to_cores(cores):
    workers, threads = default_cluster_shape(cores)
    assert workers >= 1 and threads >= 1
    assert workers * threads == cores
    if cores <= 4:
        assert threads == 1


@pytest.mark.parametrize(
    ("cores", "shape"),
    [(2, (2, 1)), (4, (4, 1)), (6, (3, 2)), (8, (4, 2)), (16, (4, 4)), (64, (8, 8))],
)
def test_default_cluster_shape_values(cores, shape):
    assert default_cluster_shape(cores) == shape


def test_default_cluster_shape_of_this_machine():
    workers, threads = default_cluster_shape()
    assert workers * threads == len(os.sched_getaffinity(0))


@pytest.mark.slow
def test_connect_to_separate_processes(cli_cluster):
    assert cli_cluster.startswith("tcp://127.0.0.1:")
    with connect(cli_cluster, timeout=10) as client:
        client.wait_for_workers(2, timeout=60)
        assert client.scheduler.address == cli_cluster
        pids = client.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()
        assert client.submit(sum, [1, 2, 3, 4]).result(timeout=30) == 10
        x = dask.array.arange(1000, chunks=100)
        assert int(client.compute(x.sum()).result(timeout=30)) == 499500
    assert client.status == "closed"


@pytest.mark.slow
def test_dkm_scheduler_variable_is_honoured(cli_cluster, monkeypatch):
    monkeypatch.setenv("DKM_SCHEDULER", cli_cluster)
    with connect(timeout=10) as client:
        assert client.scheduler.address == cli_cluster
        client.wait_for_workers(1, timeout=60)
        assert client.submit(pow, 2, 10).result(timeout=30) == 1024


def test_unreachable_scheduler_fails_fast(closed_port):
    address = f"tcp://127.0.0.1:{closed_port}"
    start = time.monotonic()
    with (
        pytest.raises(
            SchedulerUnreachable, match=rf"no Dask scheduler answered at {address} within 2 s"
        ),
        connect(address, timeout=2),
    ):
        pytest.fail("connected to a closed port")
    assert time.monotonic() - start < 8


def test_unreachable_scheduler_from_variable(closed_port, monkeypatch):
    monkeypatch.setenv("DKM_SCHEDULER", f"tcp://127.0.0.1:{closed_port}")
    with pytest.raises(SchedulerUnreachable, match=f"127.0.0.1:{closed_port}"), connect(timeout=1):
        pytest.fail("connected to a closed port")


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("DKM_SCHEDULER", raising=False)
    with dask.config.set({"scheduler-address": None}):
        assert resolve_address() is None
    with dask.config.set({"scheduler-address": "tcp://from-config:1"}):
        assert resolve_address() == "tcp://from-config:1"
        monkeypatch.setenv("DKM_SCHEDULER", "tcp://from-env:2")
        assert resolve_address() == "tcp://from-env:2"
        assert resolve_address("tcp://given:3") == "tcp://given:3"
        # The job's cluster.address sits below the variable and above dask's config.
        assert resolve_address(None, "tcp://job:4") == "tcp://from-env:2"
        monkeypatch.setenv("DKM_SCHEDULER", "")  # empty counts as unset
        assert resolve_address(None, "tcp://job:4") == "tcp://job:4"
        assert resolve_address() == "tcp://from-config:1"
    with pytest.raises(SchedulerUnreachable, match="--scheduler is empty"):
        resolve_address("  ")


@pytest.fixture
def silent_socket():
    """A 127.0.0.1 port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture
def http_port():
    """A plain HTTP server on 127.0.0.1, like a dashboard port given by mistake."""
    server = socketserver.TCPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["silent_socket", "http_port"])
def test_something_that_is_not_a_scheduler_is_refused_in_time(request, server):
    port = request.getfixturevalue(server)
    start = time.monotonic()
    with (
        pytest.raises(SchedulerUnreachable, match="did not answer the Dask handshake within 2 s"),
        connect(f"tcp://127.0.0.1:{port}", timeout=2),
    ):
        pytest.fail("connected to something that is not a scheduler")
    assert time.monotonic() - start < 10


def test_a_worker_address_is_not_a_scheduler(threaded_cluster):
    worker = next(iter(threaded_cluster.scheduler_info["workers"]))
    with pytest.raises(SchedulerUnreachable, match="is a Dask Worker, not a scheduler"):
        check_scheduler(worker, 5)
    check_scheduler(threaded_cluster.scheduler_address, 5)


BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _blas_env():
    return {k: os.environ.get(k) for k in BLAS_VARS}


@pytest.mark.slow
def test_local_cluster_when_no_address(monkeypatch):
    monkeypatch.delenv("DKM_SCHEDULER", raising=False)
    with (
        dask.config.set({"scheduler-address": None}),
        connect(n_workers=1, dashboard_address=None) as client,
    ):
        info = client.scheduler_info()
        assert info["address"].startswith("tcp://127.0.0.1:")  # not a network service
        assert len(info["workers"]) == 1
        (worker,) = info["workers"].values()
        assert worker["nthreads"] == len(os.sched_getaffinity(0))  # 1 worker x all cores
        assert list(client.run(_blas_env).values()) == [dict.fromkeys(BLAS_VARS, "1")]
        assert client.submit(lambda: 41 + 1).result(timeout=30) == 42


def test_tls_scheduler_through_dask_security_config(tmp_path):
    """A tls:// address works with nothing but dask's TLS config, as a user would set it."""
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    from dkm.runtime import connect

    sec = Security.temporary()  # self-signed CA and certificates, in memory
    files = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(getattr(sec, name))
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        security=sec,
        dashboard_address=None,
        host="127.0.0.1",
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        config = {
            "distributed.comm.tls.ca-file": str(files["tls_ca_file"]),
            "distributed.comm.tls.client.cert": str(files["tls_client_cert"]),
            "distributed.comm.tls.client.key": str(files["tls_client_key"]),
            "distributed.comm.require-encryption": True,
        }
        with dask.config.set(config), connect(cluster.scheduler_address) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
        # Without the certificates the same address is refused.
        with pytest.raises(SchedulerUnreachable, match="no TLS configuration"):
            with connect(cluster.scheduler_address, timeout=3):
                pass
