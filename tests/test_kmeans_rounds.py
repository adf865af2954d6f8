"""Lloyd in rounds (several iterations per scheduler round trip) is the task-by-task Lloyd.

The ranks of a round all-gather their per-block statistics and each computes the next
centres with the client's arithmetic, so the centres, labels and history must be the
task-by-task loop's to the last bit: under every empty-cluster policy, with the client's
reduction and the tree, when a round fails half-way, and across a checkpoint and resume.
"""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import assert_same_fit, worker_processes
from distributed import Client
from sklearn.datasets import make_blobs

from dkm.kmeans import _rounds
from dkm.kmeans.estimators import KMeans

POLICIES = ["farthest", "random-point", "random-vector", "zero", "keep"]
SAME = [
    "inertia",
    "center_shift",
    "n_moved",
    "n_empty",
    "n_reseeded",
    "extra_passes",
    "n_computed",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(12_000, n_features=9, centers=8, cluster_std=2.0, random_state=3)
    return x.astype(np.float32)


def _fit(x, mode: str, extra: dict | None = None, **params):
    settings = {"dkm.lloyd.rounds": mode, **(extra or {})}
    with dask.config.set(settings):
        return KMeans(**{"n_clusters": 8, "tol": 0, "random_state": 0, **params}).fit(x)


def _assert_same(a, b):
    assert a.history_.attrs["converged"] == b.history_.attrs["converged"]
    assert_same_fit(a, b, SAME)


@pytest.mark.parametrize("algorithm", ["lloyd", "hamerly"])
@pytest.mark.parametrize("policy", POLICIES)
def test_rounds_equal_the_task_by_task_loop_under_every_empty_policy(
    client, blobs, policy, algorithm
):
    # Uniform vectors in the data's range leave clusters empty in the first iterations.
    params = {"init": "uniform", "empty_cluster": policy, "max_iter": 40, "algorithm": algorithm}
    x = da.from_array(blobs, chunks=1_500)  # 8 blocks over 2 worker processes
    plain = _fit(x, "off", **params)
    rounds = _fit(x, "always", **params)
    assert plain.history_["n_empty"].values.sum() > 0 or policy == "keep"
    assert rounds.history_["in_round"].values.all()
    assert not plain.history_["in_round"].values.any()
    _assert_same(plain, rounds)


def test_rounds_run_yinyang_passes_like_the_task_by_task_loop(client, blobs):
    """Many centres (4 groups of them): the ranks keep the group bounds between rounds."""
    params = {"n_clusters": 64, "init": "k-means++", "max_iter": 30, "algorithm": "yinyang"}
    x = da.from_array(blobs, chunks=3_000)
    plain = _fit(x, "off", **params)
    rounds = _fit(x, "always", **params)
    assert rounds.history_["in_round"].values.all()
    assert rounds.history_["n_computed"].values[-1] < 0.5 * len(blobs)
    _assert_same(plain, rounds)


def test_rounds_combine_like_the_tree_reduction(client, blobs):
    x = da.from_array(blobs, chunks=1_000)  # 12 blocks: a tree of two levels with fan-in 8
    tree = {"dkm.backend.client-reduce-bytes": 0}
    plain = _fit(x, "off", tree, max_iter=25, algorithm="lloyd")
    rounds = _fit(x, "always", tree, max_iter=25, algorithm="lloyd")
    assert rounds.history_["in_round"].values.all()
    _assert_same(plain, rounds)


def test_auto_starts_rounds_after_short_iterations(client, blobs):
    x = da.from_array(blobs, chunks=1_500)
    auto = _fit(x, "auto", init="random", max_iter=30)
    in_round = auto.history_["in_round"].values
    # Two task-by-task iterations are measured first (a slow first one delays the start);
    # once on, rounds stay on.
    assert not in_round[:2].any() and in_round[-20:].all()
    assert (np.diff(in_round) >= 0).all()
    _assert_same(_fit(x, "off", init="random", max_iter=30), auto)
    assert auto.history_["n_computed"].values[-1] < len(blobs)  # the rounds pruned too


def test_once_begun_rounds_go_on_when_iterations_grow_longer(client, blobs, monkeypatch):
    """Iterations that grow past ``round-below`` after the rounds began stay in rounds: the
    blocks' last steps are then the ranks' results, which a task-by-task pass cannot read
    (a dictionary sweep failed at k = 2048 and 8192 with "'RoundSteps' object is not
    iterable")."""
    run = _rounds.Rounds.run

    def run_then_slow(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        self.below = 0.0  # every iteration from now on is "long"
        return out

    monkeypatch.setattr(_rounds.Rounds, "run", run_then_slow)
    x = da.from_array(blobs, chunks=1_500)
    auto = _fit(
        x, "auto", {"dkm.lloyd.round-seconds": "1ms"}, init="random", max_iter=30, algorithm="lloyd"
    )
    in_round = auto.history_["in_round"].values
    assert in_round.sum() > 2 and (np.diff(in_round) >= 0).all()
    assert (auto.history_["n_tasks"].values[in_round == 1] > 0).sum() > 1  # several rounds
    _assert_same(_fit(x, "off", init="random", max_iter=30, algorithm="lloyd"), auto)


def test_a_failed_round_goes_on_task_by_task_with_the_same_result(blobs):
    """A worker retired between two rounds: the next round's ranks cannot all start, so the
    rounds end and the fit goes on task by task, to the same centres, labels and history."""
    x = da.from_array(blobs, chunks=1_500)
    gone = []
    with worker_processes(2) as cluster, Client(cluster) as c:

        def retire_one(state):
            if state.iteration >= 4 and not gone:
                first = sorted(c.scheduler_info()["workers"])[0]
                c.retire_workers([first])
                gone.append(first)

        params = {"max_iter": 30, "algorithm": "lloyd", "init": "random"}
        plain = _fit(x, "off", **params)
        with dask.config.set({"dkm.lloyd.rounds": "always", "dkm.lloyd.round-seconds": "1ms"}):
            t0 = time.monotonic()
            failing = KMeans(8, tol=0, random_state=0, **params).fit(x, callback=retire_one)
            # The rank left waiting is called off, not held until dkm.lloyd.round-timeout.
            assert time.monotonic() - t0 < 30
            assert gone
            in_round = failing.history_["in_round"].values
            assert in_round[:4].all() and not in_round[-10:].any()
            _assert_same(plain, failing)


def test_threads_never_run_rounds(blobs):
    with dask.config.set(scheduler="threads"):
        km = _fit(blobs, "always", max_iter=5)
    assert not km.history_["in_round"].values.any()
