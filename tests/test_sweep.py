"""Elbow detection on curves with a known knee, and the sweep table."""

from __future__ import annotations

import numpy as np
import pytest

from dkm.results.sweep import elbow, sweep_table


def test_elbow_of_a_sharp_knee():
    ks = [1, 2, 3, 4, 5, 6, 7, 8]
    inertia = [1000, 400, 120, 100, 90, 82, 76, 71]
    assert elbow(ks, inertia) == 3


def test_elbow_on_blob_inertia_finds_the_true_k():
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(2000, n_features=5, centers=6, cluster_std=0.5, random_state=0)
    ks = list(range(2, 13))
    inertia = [KMeans(k, n_init=3, random_state=0).fit(x).inertia_ for k in ks]
    assert elbow(ks, inertia) == 6


def test_log_sweep_uses_log_k():
    ks = [2**i for i in range(1, 11)]
    inertia = [1.0 / np.log2(k) ** 0.5 if k < 32 else 0.45 - 0.001 * np.log2(k) for k in ks]
    assert elbow(ks, inertia) in (16, 32)


@pytest.mark.parametrize(
    ("ks", "values"), [([4, 8], [10, 5]), ([1, 2, 3], [5, 5, 5]), ([1, 2, 3, 4], [4, 3, 2, 1])]
)
def test_no_elbow(ks, values):
    assert elbow(ks, values) is None


def test_sweep_table_sorted_with_elbow():
    table = sweep_table([8, 2, 4, 1], {"inertia": [80, 120, 100, 1000], "accuracy": [1, 2, 3, 4]})
    assert table["k"].values.tolist() == [1, 2, 4, 8]
    assert table["inertia"].values.tolist() == [1000, 120, 100, 80]
    assert table.attrs["elbow_k"] == 2


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 k values but 3"):
        elbow([1, 2], [1, 2, 3])


def test_sweep_table_by_algorithm_fills_gaps_and_finds_each_elbow():
    ks = [1, 2, 4, 8, 2, 4]
    algos = ["lloyd"] * 4 + ["minibatch"] * 2
    inertia = [1000, 120, 100, 80, 130, 110]
    table = sweep_table(ks, {"inertia": inertia}, algorithms=algos)
    assert table["inertia"].dims == ("algorithm", "k")
    assert list(table["algorithm"].values) == ["lloyd", "minibatch"]
    assert table["inertia"].sel(algorithm="minibatch", k=2) == 130
    assert np.isnan(table["inertia"].sel(algorithm="minibatch", k=8))
    assert table.attrs["elbows"] == {"lloyd": 2, "minibatch": -1}
    assert table.attrs["elbow_k"] == 2
