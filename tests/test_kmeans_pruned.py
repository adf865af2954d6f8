"""The fused assignment kernel and the pruned (Hamerly, Yinyang) Lloyd: exact against references.

The fused kernel must give numpy's argmin (first index on ties), the squared distances and
the float64 per-cluster sums of a plain numpy reference; both pruned Lloyds must give the
plain Lloyd's labels, centres and history to the last bit, under every empty-cluster
policy, on threads and on worker processes.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from conftest import assert_same_fit
from sklearn.datasets import make_blobs

from dkm._parallel import kernels
from dkm._parallel.kernels import Tiles
from dkm.kmeans import _hamerly, _yinyang
from dkm.kmeans.estimators import KMeans

POLICIES = ["farthest", "random-point", "random-vector", "zero", "keep"]
PRUNED = ["hamerly", "yinyang"]


@pytest.fixture(autouse=True)
def _task_by_task():
    """Pruning runs task by task: rounds (test_kmeans_rounds.py) compute every distance."""
    with dask.config.set({"dkm.lloyd.rounds": "off"}):
        yield


def _reference(x: np.ndarray, centers: np.ndarray):
    """Plain numpy: the expanded distances in the working dtype, argmin, sums in float64."""
    packed = kernels.pack_centers(centers, x.dtype)
    dist = x @ packed[:-1] + packed[-1]
    labels = np.argmin(dist, axis=1)
    rows = np.arange(len(x))
    xsq = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(dist[rows, labels] + xsq, 0)
    dist[rows, labels] = np.inf
    second = np.maximum(dist.min(axis=1) + xsq, 0) if centers.shape[0] > 1 else None
    k, d = centers.shape
    sums = np.zeros((k, d))
    np.add.at(sums, labels, x.astype(np.float64))
    return labels, d2, second, sums, np.bincount(labels, minlength=k)


def _tied_data(dtype):
    """Rows with exact ties: duplicated centres, and rows half-way between two centres."""
    rng = np.random.default_rng(0)
    centers = (4 * rng.integers(-4, 5, size=(37, 6))).astype(dtype)
    centers[2] = centers[1]
    centers[2, 0] += 2  # the mid-point of 1 and 2 is 1 from both, 3 or more from the rest
    centers[5] = centers[3]  # duplicates: their rows must go to the lower index
    centers[20] = centers[3]
    x = rng.integers(-16, 17, size=(3000, 6)).astype(dtype)
    x[:100] = (centers[1] + centers[2]) / 2
    x[100:200] = centers[3]
    return x, centers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tile_bytes", [2**20, 4 * 256 * 8])  # one tile of centres; chunks of 8
@pytest.mark.parametrize("n_centres", [37, 10])  # centres x rows GEMM; rows x centres below 32
def test_fused_pass_matches_numpy_including_ties(dtype, tile_bytes, n_centres):
    x, centers = _tied_data(dtype)
    centers = centers[:n_centres]
    tiles = Tiles(tile_bytes=tile_bytes)
    packed = kernels.pack_centers(centers, np.dtype(dtype))
    n, k = len(x), len(centers)
    labels = np.empty(n, np.int32)
    d2, second = np.empty(n, dtype), np.empty(n, dtype)
    sums, counts = np.zeros((k, x.shape[1])), np.zeros(k, np.int64)
    kernels.fused_pass(x, packed, tiles, labels, d2=d2, second=second, sums=sums, counts=counts)
    ref_labels, ref_d2, ref_second, ref_sums, ref_counts = _reference(x, centers)
    np.testing.assert_array_equal(labels, ref_labels)
    assert (labels[:100] == 1).all() and (labels[100:200] == 3).all()
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(second, ref_second, rtol=1e-6, atol=1e-5)
    assert (second[100:200] == 0).all()  # the duplicates of centre 3
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-12)


@pytest.mark.parametrize(("n", "d", "k"), [(20_000, 25, 300), (3_000, 784, 10)])
def test_fused_step_equals_the_numpy_step_to_the_bit(n, d, k):
    """Workers below ``numba_min_memory`` run the numpy twin: the same labels and sums."""
    x, _ = make_blobs(n, n_features=d, centers=k, random_state=1)
    x = x.astype(np.float32)
    centers = x[np.random.default_rng(2).choice(len(x), k, replace=False)]
    packed = kernels.pack_centers(centers, np.dtype(np.float32))
    fused = kernels.lloyd_step(x, packed, None, Tiles(numba_min_memory=0))
    plain = kernels.lloyd_step(x, packed, None, Tiles(numba_min_memory=2**62))
    np.testing.assert_array_equal(fused[0], plain[0])
    np.testing.assert_array_equal(fused[2][0], plain[2][0])  # float64 sums, same bits
    np.testing.assert_array_equal(fused[2][1], plain[2][1])
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("numba_min_memory", [0, 2**62])  # the fused pass; the numpy twin
def test_lloyd_steps_keep_the_row_norms_and_get_the_bits_of_a_fresh_pass(numba_min_memory):
    """A block's squared row norms are computed by its first step and handed on: the next
    step's distances are those of a step that computed them afresh."""
    rng = np.random.default_rng(5)
    x = rng.random((1_000, 784), dtype=np.float32) - 0.5
    tiles = Tiles(numba_min_memory=numba_min_memory)
    first = kernels.pack_centers(x[:10].astype(np.float64), np.dtype(np.float32))
    then = kernels.pack_centers(x[10:20].astype(np.float64), np.dtype(np.float32))
    step = kernels.lloyd_step(x, first, None, tiles)
    np.testing.assert_allclose(step[3], np.einsum("ij,ij->i", x, x), rtol=1e-5)
    kept = kernels.lloyd_step(x, then, step, tiles)
    assert kept[3] is step[3]
    fresh = kernels.lloyd_step(x, then, None, tiles)
    np.testing.assert_array_equal(kept[0], fresh[0])
    np.testing.assert_array_equal(kept[1], fresh[1])
    ref = _reference(x, x[10:20])
    np.testing.assert_array_equal(kept[0], ref[0])
    np.testing.assert_allclose(kept[1], ref[1], rtol=1e-5, atol=1e-4)
    narrow = kernels.lloyd_step(x[:, :25], first[[*range(25), -1]], None, tiles)
    assert narrow[3] is None  # 100-byte rows: computed in the pass, not kept


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [3, 25, 64, 784, 1001])
def test_row_norms_computed_in_the_pass_or_before_have_the_same_bits(d, dtype):
    """The squared distances a pass computes with the rows' norms it was given (kept by a
    Lloyd fit) are those it computes alone, so pruned passes that recompute rows agree."""
    rng = np.random.default_rng(d)
    n = kernels.NORM_ROWS + 600 if d < 64 else 600  # norms of more than one call's rows
    x = (rng.random((n, d)) - 0.5).astype(dtype)
    packed = kernels.pack_centers(x[:40].astype(np.float64), np.dtype(dtype))
    tiles = Tiles()
    out = []
    for xsq in (None, kernels.row_sqnorms(x, tiles)):
        labels, d2, second = np.empty(n, np.int32), np.empty(n, dtype), np.empty(n, dtype)
        kernels.fused_pass(x, packed, tiles, labels, d2=d2, second=second, xsq=xsq)
        out.append((labels, d2, second))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_centres", [10, 40])  # rows x centres GEMM; centres x rows
def test_a_rows_distances_do_not_depend_on_the_rows_beside_it(n_centres):
    """The pruned passes recompute a few gathered rows and must get the plain pass's bits.
    BLAS takes another path for a GEMM of a few rows (784 features: the distances of one row
    alone differed in the 5th digit), so every tile is computed at full height."""
    rng = np.random.default_rng(11)
    x = rng.random((700, 784), dtype=np.float32) - 0.5
    packed = kernels.pack_centers(x[:n_centres].astype(np.float64), np.dtype(np.float32))

    def run(rows):
        out = np.empty(len(rows), np.int32), np.empty(len(rows), np.float32)
        second = np.empty(len(rows), np.float32)
        kernels.fused_pass(rows, packed, Tiles(), out[0], d2=out[1], second=second)
        return out[0], out[1], second

    whole = run(x)
    for pick in ([5], [650, 3], rng.choice(700, 97, replace=False)):
        for a, b in zip(run(x[pick]), whole, strict=True):
            np.testing.assert_array_equal(a, b[pick])


def test_farthest_from_the_step_equals_a_distance_pass():
    x, _ = make_blobs(5_000, n_features=4, centers=6, random_state=3)
    x = x.astype(np.float32)
    packed = kernels.pack_centers(x[:6], np.dtype(np.float32))
    tiles = Tiles()
    step = kernels.lloyd_step(x, packed, None, tiles)
    kept = kernels.farthest_from_step(x, step, 5, 1000)
    again = kernels.farthest_rows(x, packed, 5, 1000, tiles)
    for a, b in zip(kept, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bounds_are_bounds():
    """After a pruned step every row's upper bound is >= its distance to its centre and its
    lower bound <= its distance to every other centre (exact float64 distances)."""
    x, _ = make_blobs(4_000, n_features=5, centers=12, random_state=4)
    x = x.astype(np.float32)
    rng = np.random.default_rng(5)
    c0 = x[rng.choice(len(x), 12, replace=False)].astype(np.float64)
    c1 = c0 + rng.normal(scale=0.3, size=c0.shape)
    c1 = c1.astype(np.float32).astype(np.float64)
    tiles = Tiles()
    first = _hamerly.hamerly_step(
        x,
        kernels.pack_centers(c0, np.dtype(np.float32)),
        None,
        _hamerly.centre_motion(None, c0),
        tiles,
    )
    step = _hamerly.hamerly_step(
        x,
        kernels.pack_centers(c1, np.dtype(np.float32)),
        first,
        _hamerly.centre_motion(c0, c1),
        tiles,
    )
    labels, (upper, lower, _) = step[0], step[1]
    dist = np.sqrt(((x.astype(np.float64)[:, None, :] - c1[None]) ** 2).sum(-1))
    rows = np.arange(len(x))
    assert (upper >= dist[rows, labels]).all()
    dist[rows, labels] = np.inf
    assert (lower <= dist.min(axis=1)).all()
    assert step[2][3] < len(x)  # some rows were skipped


def test_group_bounds_are_bounds():
    """After a Yinyang step every row's upper bound is >= its distance to its centre, and
    each group's lower bound <= its distance to every other centre of that group."""
    x, _ = make_blobs(6_000, n_features=5, centers=64, random_state=4)
    x = x.astype(np.float32)
    rng = np.random.default_rng(5)
    c0 = x[rng.choice(len(x), 64, replace=False)].astype(np.float64)
    c1 = (c0 + rng.normal(scale=0.3, size=c0.shape)).astype(np.float32).astype(np.float64)
    c2 = (c1 + rng.normal(scale=0.05, size=c0.shape)).astype(np.float32).astype(np.float64)
    tiles = Tiles()
    step = None
    for prev_c, c in [(None, c0), (c0, c1), (c1, c2)]:
        packed = kernels.pack_centers(c, np.dtype(np.float32))
        motion = _hamerly.centre_motion(prev_c, c, half_gaps=False)
        step = _yinyang.yinyang_step(x, packed, step, motion, tiles)
        labels, (upper, lower, _, groups) = step[0], step[1]
        np.testing.assert_array_equal(labels, _reference(x, c)[0])
        dist = np.sqrt(((x.astype(np.float64)[:, None, :] - c[None]) ** 2).sum(-1))
        rows = np.arange(len(x))
        assert (upper >= dist[rows, labels]).all()
        dist[rows, labels] = np.inf
        for g in range(lower.shape[1]):
            assert (lower[:, g] <= dist[:, groups == g].min(axis=1)).all()
    assert lower.shape[1] == 4
    assert step[2][3] < len(x)  # some rows were skipped


def test_yinyang_breaks_ties_across_groups_as_the_plain_pass():
    """Rows exactly half-way between two centres of different groups take the lower index,
    as numpy's argmin does, whichever group is computed first (integer data: exact ties)."""
    rng = np.random.default_rng(8)
    left = rng.integers(-6, 7, size=(15, 2))
    right = rng.integers(-6, 7, size=(15, 2)) + np.array([100, 0])
    # Index 0 (group of the right) and 31 (the left) tie at (50, 0); index 1 (the left) and
    # 30 (the right) tie at (50, 40): one of the two pairs has its lower index in the group
    # computed last.
    c = np.vstack([[[60, 0], [40, 40]], left, right, [[60, 40], [40, 0]]]).astype(np.float64)
    x = np.vstack([np.tile([[50, 0], [50, 40]], (50, 1)), rng.integers(-10, 111, (500, 2))])
    x = x.astype(np.float32)
    moved = c + [0, 1] * (np.arange(len(c))[:, None] >= 2)  # all but the first two move
    step, before = None, None
    for now in (c, moved, moved):  # a first pass, then pruned ones
        packed = kernels.pack_centers(now, np.dtype(np.float32))
        motion = _hamerly.centre_motion(before, now, half_gaps=False)
        step = _yinyang.yinyang_step(x, packed, step, motion, Tiles())
        assert len(np.unique(step[1][3][[0, 1, 30, 31]])) == 2  # the pairs span the groups
        np.testing.assert_array_equal(step[0], _reference(x, now)[0])
        before = now
    assert set(step[0][:100]) == {0, 1}


def _fit_pair(X, C0, algorithm="hamerly", **kw):
    plain = KMeans(len(C0), init=C0, algorithm="lloyd", **kw).fit(X)
    pruned = KMeans(len(C0), init=C0, algorithm=algorithm, **kw).fit(X)
    return plain, pruned


def _assert_identical(plain, pruned, algorithm="hamerly"):
    assert pruned.history_.attrs["assignment"] == algorithm
    keys = ("inertia", "center_shift", "n_moved", "n_empty", "n_reseeded")
    assert_same_fit(plain, pruned, keys)


def _blobs_and_start(n=40_000, d=8, k=40, seed=0):
    X, _ = make_blobs(n, n_features=d, centers=k, cluster_std=2.5, random_state=seed)
    X = X.astype(np.float32)
    C0 = X[np.random.default_rng(seed).choice(n, k, replace=False)].astype(np.float64)
    return X, C0


@pytest.mark.parametrize("algorithm", PRUNED)
def test_pruned_lloyd_is_lloyd_on_threads(threaded_client, algorithm):
    X, C0 = _blobs_and_start()
    plain, pruned = _fit_pair(X, C0, algorithm, tol=0, max_iter=200)
    _assert_identical(plain, pruned, algorithm)
    assert plain.history_.attrs["converged"] == "strict"
    computed = pruned.history_["n_computed"].values
    assert (plain.history_["n_computed"].values == len(X)).all()
    # Pruning must actually skip work: late iterations compute a small share of the rows.
    assert computed[0] == len(X) and computed[-3:].max() < 0.2 * len(X)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", PRUNED)
def test_pruned_lloyd_is_lloyd_on_worker_processes(client, algorithm):
    X, C0 = _blobs_and_start(n=30_000, k=48, seed=1)
    plain, pruned = _fit_pair(X, C0, algorithm, tol=1e-4, max_iter=100)
    _assert_identical(plain, pruned, algorithm)
    assert pruned.history_.attrs["backend"] == "distributed"


@pytest.mark.parametrize("algorithm", PRUNED)
@pytest.mark.parametrize("policy", POLICIES)
def test_pruned_lloyd_is_lloyd_under_every_empty_cluster_policy(threaded_client, policy, algorithm):
    X, _ = make_blobs(6_000, n_features=3, centers=6, cluster_std=0.6, random_state=2)
    X = X.astype(np.float32)
    # Centres no row picks at first (far away, several groups of them for Yinyang), and a
    # duplicate: clusters go empty.
    far = 500.0 + 50 * np.arange(30, dtype=np.float64)[:, None] * np.ones((1, 3))
    C0 = np.vstack([X[[0, 10, 20, 30, 40, 50]], X[[10]], far[:2 if algorithm == "hamerly" else 30]])
    plain, pruned = _fit_pair(
        X, C0.astype(np.float64), algorithm, tol=0, max_iter=60, empty_cluster=policy,
        random_state=3,
    )  # fmt: skip
    _assert_identical(plain, pruned, algorithm)
    assert plain.history_["n_empty"].values[0] >= 2


@pytest.mark.parametrize("algorithm", PRUNED)
def test_pruned_lloyd_on_float64_data_with_large_offsets(threaded_client, algorithm):
    """Rows far from the origin: the rounding margins must keep the pruning exact."""
    X, C0 = _blobs_and_start(n=20_000, d=5, k=40, seed=4)
    X = X.astype(np.float64) + 1e4
    plain, pruned = _fit_pair(X, C0 + 1e4, algorithm, tol=0, max_iter=80, dtype=np.float64)
    _assert_identical(plain, pruned, algorithm)


@pytest.mark.parametrize("algorithm", PRUNED)
def test_pruned_lloyd_is_lloyd_on_duplicate_rows_and_near_ties(threaded_client, algorithm):
    """Image patches: most rows are one repeated (blank) patch with a centre exactly on it,
    others sit half-way between two centres (exact ties); Yinyang has 8 groups of centres.
    The races are decided from each centre's own rounding bound, or in full when too close."""
    rng = np.random.default_rng(7)
    strokes = rng.integers(0, 3, size=(4_000, 9)).astype(np.float32) / 255 * 40
    X = np.vstack([np.zeros((6_000, 9), np.float32), strokes])
    C0 = np.vstack([np.zeros((1, 9)), strokes[:159].astype(np.float64)])
    X[-200:] = (C0[5] + C0[6]) / 2  # exact ties between centres 5 and 6
    assert _yinyang.n_groups(len(C0)) == 8
    plain, pruned = _fit_pair(X, C0, algorithm, tol=0, max_iter=40)
    _assert_identical(plain, pruned, algorithm)
    # The blank rows settle on their centre and stay skipped.
    assert pruned.history_["n_computed"].values[-1] < 0.5 * len(X)


def test_auto_switches_between_plain_and_pruned_passes_and_stays_exact(threaded_client):
    """Many centres in 3 dimensions: early pruned passes recompute most rows, so "auto" runs
    plain passes for a while, then prunes again; the fit is still the plain one."""
    X = np.random.default_rng(0).random((30_000, 3), dtype=np.float32)
    C0 = X[:300].astype(np.float64)
    plain = KMeans(300, init=C0, algorithm="lloyd", tol=0, max_iter=60).fit(X)
    auto = KMeans(300, init=C0, algorithm="auto", tol=0, max_iter=60).fit(X)
    assert auto.history_.attrs["assignment"] == "auto"
    computed = auto.history_["n_computed"].values
    assert computed[1] > 0.8 * len(X)  # a pruned pass that did not pay...
    assert (computed[2:6] == len(X)).all()  # ...so four plain ones,
    assert computed[-1] < 0.2 * len(X)  # and pruned ones again once the rows settle
    assert plain.n_iter_ == auto.n_iter_
    np.testing.assert_array_equal(plain.cluster_centers_, auto.cluster_centers_)
    np.testing.assert_array_equal(np.asarray(plain.labels_), np.asarray(auto.labels_))
    np.testing.assert_array_equal(plain.history_["inertia"], auto.history_["inertia"])


@pytest.mark.slow
def test_workers_too_small_for_numba_take_the_plain_numpy_step(client):
    """On a worker whose memory limit is below ``numba_min_memory`` the pruned step is the
    plain one in numpy (numba's compiler would take ~120 MB of the worker)."""
    x, _ = make_blobs(3_000, n_features=4, centers=5, random_state=6)
    x = x.astype(np.float32)
    c = x[:5].astype(np.float64)
    packed = kernels.pack_centers(c, np.dtype(np.float32))
    small = Tiles(numba_min_memory=2**62)  # above any worker's limit
    motion = _hamerly.centre_motion(None, c)
    step = client.submit(_hamerly.hamerly_step, x, packed, None, motion, small).result()
    assert isinstance(step[1], np.ndarray)  # squared distances, not bounds
    np.testing.assert_array_equal(step[0], _reference(x, c)[0])
