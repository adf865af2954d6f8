"""Job files: valid ones parse to the expected spec; each malformed one names its problem."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dkm.jobs import JobSpecError, load_job, parse_job

VALID = {
    "name": "mnist-patches-sweep",
    "data": {"dataset": "mnist-5k", "store": "data/mnist-5k.zarr"},
    "features": {"kind": "patches", "size": 5, "stride": 5, "pad": 1, "drop_empty": False},
    "model": {
        "algorithm": "lloyd",
        "init": "k-means||",
        "k": [16, 64],
        "max_iter": 100,
        "tol": 1.0e-4,
        "random_state": 0,
    },
    "evaluate": ["inertia", "reconstruction_error"],
    "output": {"store": "results/sweep.zarr", "labels": False, "report": True},
    "cluster": {"address": None, "n_workers": None, "threads_per_worker": None},
}


def with_change(path: str, value, *, delete: bool = False) -> dict:
    """VALID with one dotted key set (or deleted)."""
    job = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = job
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return job


def test_valid_job_parses_with_defaults():
    spec = parse_job(VALID)
    assert spec.model.k == (16, 64)
    assert spec.model.tol == 1e-4 and isinstance(spec.model.tol, float)
    assert spec.features.size == 5 and spec.features.split == "all"
    assert spec.output.checkpoint_every == 5
    assert spec.evaluate == ("inertia", "reconstruction_error")
    assert spec.to_dict()["model"]["k"] == [16, 64]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (7, (7,)),
        ([3, 5, 9], (3, 5, 9)),
        ({"start": 2, "stop": 16384, "scale": "log2"}, tuple(2**i for i in range(1, 15))),
        ({"start": 4, "stop": 20}, (4, 8, 16)),
        ({"start": 2, "stop": 10, "scale": "linear", "step": 4}, (2, 6, 10)),
    ],
)
def test_k_forms(raw, expected):
    assert parse_job(with_change("model.k", raw)).model.k == expected


MALFORMED = [
    # (job, key named in the error, words in the message)
    (with_change("colour", "blue"), "colour", "unknown section"),
    (with_change("model.learning_rate", 0.1), "model.learning_rate", "unknown key"),
    (with_change("model.max_iter", "ten"), "model.max_iter", "must be an integer >= 1, got 'ten'"),
    (with_change("model.k", 0), "model.k", "k must be >= 1"),
    (with_change("model.k", []), "model.k", "empty list"),
    (with_change("model.k", [4, "8"]), "model.k", "expected integers"),
    (with_change("model.k", {"start": 64, "stop": 8}), "model.k", "start <= stop"),
    (with_change("model.k", 20000), "model.k", "k must be <= 16384"),
    (with_change("model.algorithm", "elkan"), "model.algorithm", "'lloyd', 'minibatch'"),
    (with_change("model.init", "kmeans+++"), "model.init", "one of 'k-means||', 'k-means++'"),
    (with_change("model.tol", -1.0), "model.tol", "must be a finite number >= 0, got -1.0"),
    (with_change("model.tol", float("nan")), "model.tol", "must be a finite number >= 0, got nan"),
    (with_change("model.random_state", -1), "model.random_state", "in [0, 2**32 - 1]"),
    (with_change("model.batch_size", 64), "model.batch_size", "unknown key for algorithm 'lloyd'"),
    (with_change("model.empty_cluster", "drop"), "model.empty_cluster", "one of 'farthest'"),
    (with_change("data.dataset", "imagenet"), "data.dataset", "got 'imagenet'"),
    (
        with_change("data.options", {"n_sample": 5}),
        "data.options.n_sample",
        "unknown option for dataset 'mnist-5k'",
    ),
    (with_change("data.store", None, delete=True), "data.store", "required key is missing"),
    (with_change("output", None, delete=True), "output", "required section is missing"),
    (with_change("output.store", None, delete=True), "output.store", "required key is missing"),
    (with_change("output.labels", "yes"), "output.labels", "must be true or false"),
    (with_change("features.size", None, delete=True), "features.size", "required when kind"),
    (with_change("features.kind", "wavelets"), "features.kind", "'pixels', 'patches'"),
    (with_change("evaluate", ["inertia", "purity"]), "evaluate", "unknown metric 'purity'"),
    (with_change("evaluate", ["accuracy"]), "evaluate", "patches have none"),
    (with_change("cluster.address", "localhost:8786"), "cluster.address", "tcp:// or tls://"),
    (with_change("cluster.n_workers", 0), "cluster.n_workers", "must be an integer >= 1"),
    (with_change("cluster.memory_limit", "lots"), "cluster.memory_limit", "a size such as"),
    (
        with_change("model.k", {"start": 1, "stop": 10**9, "scale": "linear"}),
        "model.k",
        "k must be <= 16384, got stop=1000000000",
    ),
    (with_change("name", ""), "name", "non-empty string"),
    (with_change("data", ["mnist"]), "data", "expected a mapping"),
]


@pytest.mark.parametrize(
    ("job", "key", "words"), MALFORMED, ids=[m[1] + ":" + m[2] for m in MALFORMED]
)
def test_malformed_jobs_name_their_problem(job, key, words):
    with pytest.raises(JobSpecError) as info:
        parse_job(job)
    problems = info.value.problems
    assert any(k == key and words in msg for k, msg in problems), problems
    assert key in str(info.value)


def test_all_problems_are_reported_together():
    job = with_change("model.max_iter", 0)
    job["model"]["k"] = 0
    job["data"]["dataset"] = "imagenet"
    with pytest.raises(JobSpecError) as info:
        parse_job(job)
    keys = {k for k, _ in info.value.problems}
    assert {"model.max_iter", "model.k", "data.dataset"} <= keys


def test_not_a_mapping():
    with pytest.raises(JobSpecError, match="a job is a mapping"):
        parse_job(["name", "x"])


def test_load_job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_job(path).name == "mnist-patches-sweep"


def test_load_job_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {k: [1, 2\n")
    with pytest.raises(JobSpecError, match=r"line \d+, column \d+: not valid YAML"):
        load_job(path)


def test_load_job_missing_file(tmp_path):
    with pytest.raises(JobSpecError, match="cannot read the job file"):
        load_job(tmp_path / "nope.yaml")


def test_job_defaults_come_from_the_estimator():
    spec = parse_job(with_change("model", {"k": 8}))
    resolved = spec.model.resolved()
    assert resolved["max_iter"] == 300 and resolved["init"] == "k-means||"  # KMeans's own
    assert resolved["random_state"] == 0  # jobs are reproducible
    assert spec.model.max_iter == 300
    mb = parse_job(with_change("model", {"k": 8, "algorithm": "minibatch", "batch_size": 64}))
    assert mb.model.resolved()["batch_size"] == 64 and mb.model.init == "k-means++"
    assert parse_job(mb.to_dict()).model == mb.model  # to_dict reads back


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(VALID) + "model: {k: 4}\n")
    with pytest.raises(
        JobSpecError, match=r"line \d+, column \d+: not valid YAML: duplicate key 'model'"
    ):
        load_job(path)


def test_an_alias_bomb_is_not_printed_whole(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    body = yaml.safe_dump({k: v for k, v in VALID.items() if k != "evaluate"})
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n" + body + "evaluate: *a8\n")
    with pytest.raises(JobSpecError) as info:
        load_job(path)
    assert len(str(info.value)) < 2000


def test_binary_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(JobSpecError, match=r"cannot read the job file|not valid YAML"):
        load_job(path)


def test_several_algorithms_share_k_and_take_the_parameters_they_have():
    spec = parse_job(
        with_change(
            "model", {"algorithm": ["lloyd", "minibatch"], "k": [4, 8], "batch_size": 64}
        )
    )
    assert spec.model.algorithms == ("lloyd", "minibatch")
    lloyd, mini = spec.model.each()
    assert lloyd.algorithm == "lloyd" and "batch_size" not in lloyd.params
    assert mini.resolved()["batch_size"] == 64 and mini.k == (4, 8)
    assert parse_job(spec.to_dict()).model == spec.model  # to_dict reads back
    with pytest.raises(ValueError, match="several algorithms"):
        spec.model.resolved()


@pytest.mark.parametrize(
    ("model", "key", "text"),
    [
        ({"algorithm": ["lloyd", "kmedoids"], "k": 4}, "model.algorithm", "'kmedoids'"),
        ({"algorithm": ["lloyd", "lloyd"], "k": 4}, "model.algorithm", "repeated"),
        ({"algorithm": [], "k": 4}, "model.algorithm", "a list of them"),
        ({"algorithm": ["lloyd", "minibatch"], "k": 4, "bogus": 1}, "model.bogus", "unknown key"),
        (
            {"algorithm": ["lloyd", "minibatch"], "k": 4, "batch_size": 0},
            "model.batch_size",
            ">= 1",
        ),
    ],
)
def test_bad_algorithm_lists_name_their_key(model, key, text):
    with pytest.raises(JobSpecError) as err:
        parse_job(with_change("model", model))
    assert any(k == key and text in m for k, m in err.value.problems), err.value.problems


def test_reconstructions_need_patches():
    job = with_change("features", {"kind": "pixels"})
    job["evaluate"] = ["inertia"]
    job["output"] = {"store": "r.zarr", "reconstructions": 4}
    with pytest.raises(JobSpecError, match=r"output\.reconstructions: images are rebuilt"):
        parse_job(job)
    spec = parse_job(with_change("output", {"store": "r.zarr", "reconstructions": 4}))
    assert spec.output.reconstructions == 4
    assert spec.metrics == ("inertia", "reconstruction_error", "image_mse", "image_rmse")


def test_sparse_coding_step_is_checked_by_its_own_rules():
    job = with_change("evaluate", ["inertia", {"sparse_coding": {"method": "omp"}}])
    spec = parse_job(job)
    assert spec.sparse_coding.method == "omp"
    assert "sparse_image_rmse" in spec.metrics
    assert parse_job(spec.to_dict()).sparse_coding == spec.sparse_coding
    cases = [
        ({"method": "kmedoids"}, "evaluate.sparse_coding.method"),
        ({"method": "omp", "n_nonzero_coefs": 0}, "evaluate.sparse_coding.n_nonzero_coefs"),
        ({"method": "omp", "alpha": 0.1}, "evaluate.sparse_coding.alpha"),
        ({"method": "omp", "bogus": 1}, "evaluate.sparse_coding.bogus"),
    ]
    for options, key in cases:
        with pytest.raises(JobSpecError) as err:
            parse_job(with_change("evaluate", [{"sparse_coding": options}]))
        assert [k for k, _ in err.value.problems] == [key], err.value.problems
    with pytest.raises(JobSpecError, match="sparse_image_rmse needs a sparse_coding step"):
        parse_job(with_change("evaluate", ["sparse_image_rmse"]))
    pixels = with_change("features", {"kind": "pixels"})
    pixels["evaluate"] = [{"sparse_coding": {"method": "omp"}}]
    with pytest.raises(JobSpecError, match=r"needs features\.kind: patches"):
        parse_job(pixels)


PIXELS = {
    "name": "heldout",
    "data": {"dataset": "mnist-5k", "store": "data/m.zarr", "options": {"test_size": 0.2}},
    "features": {"kind": "pixels", "split": "train"},
    "model": {"algorithm": "lloyd", "k": 10},
    "output": {"store": "results/h.zarr"},
}


def test_evaluate_mapping_form_with_heldout_splits_and_a_silhouette_sample():
    job = {
        **PIXELS,
        "evaluate": {
            "metrics": ["accuracy", "silhouette"],
            "on": ["train", "test"],
            "silhouette_sample": 500,
        },
    }
    spec = parse_job(job)
    assert spec.evaluate == ("accuracy", "silhouette")
    assert spec.evaluate_on == ("train", "test") and spec.heldout == ("test",)
    assert spec.silhouette_sample == 500
    again = parse_job(spec.to_dict())  # to_dict reads back
    assert (again.evaluate, again.evaluate_on, again.silhouette_sample) == (
        spec.evaluate,
        spec.evaluate_on,
        spec.silhouette_sample,
    )
    # The list form is the mapping's metrics alone.
    assert parse_job({**PIXELS, "evaluate": ["accuracy"]}).evaluate_on == ()


@pytest.mark.parametrize(
    ("evaluate", "features", "algorithm", "key", "words"),
    [
        ({"metrics": ["accuracy"], "on": ["validation"]}, None, "lloyd", "evaluate.on", "splits"),
        ({"metrics": ["inertia"], "on": ["test"]}, {"kind": "patches", "size": 5}, "lloyd",
         "evaluate.on", "patches are not samples"),
        ({"metrics": ["accuracy"], "silhouette_sample": 100}, None, "lloyd",
         "evaluate.silhouette_sample", "add silhouette"),
        ({"metrics": ["silhouette"], "silhouette_sample": 1}, None, "lloyd",
         "evaluate.silhouette_sample", ">= 2"),
        ({"metrics": ["accuracy"], "sample": 3}, None, "lloyd", "evaluate.sample",
         "unknown key"),
        (["bic"], None, "lloyd", "evaluate", "needs model.algorithm: gmm"),
    ],
)
def test_bad_evaluate_sections_name_their_key(evaluate, features, algorithm, key, words):
    job = copy.deepcopy({**PIXELS, "evaluate": evaluate})
    job["model"]["algorithm"] = algorithm
    if features is not None:
        job["features"] = features
    with pytest.raises(JobSpecError) as err:
        parse_job(job)
    assert any(k == key and words in m for k, m in err.value.problems), err.value.problems


def test_mixture_metrics_with_a_gmm_among_the_algorithms():
    job = {**PIXELS, "evaluate": ["bic", "aic", "log_likelihood", "accuracy"]}
    job["model"] = {"algorithm": ["lloyd", "gmm"], "k": 10}
    assert parse_job(job).evaluate == ("bic", "aic", "log_likelihood", "accuracy")


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"evaluate": {"metrics": ["accuracy"], "on": ["test"]}, "options": {}},
         "evaluate.on", "no 'test' samples"),
        ({"evaluate": {"metrics": ["silhouette"], "silhouette_sample": 4500}},
         "evaluate.silhouette_sample", "4500 > the 4000 samples"),
        ({"features": {"kind": "pca", "n_components": 900, "split": "train"}},
         "features.n_components", "900 > 784"),
    ],
)
def test_what_only_the_data_reveals_is_named_before_compute(change, key, words):
    from dkm.data import catalog
    from dkm.jobs import check_against_data

    job = copy.deepcopy(PIXELS)
    job["data"]["options"] = change.pop("options", job["data"]["options"])
    job.update(change)
    spec = parse_job(job)
    shape = catalog.known_shape("mnist-5k", job["data"]["options"])
    found = check_against_data(spec, shape, "data/m.zarr")
    assert any(k == key and words in m for k, m in found), found


def test_rules_between_model_parameters_fail_before_anything_runs():
    job = copy.deepcopy(PIXELS)
    job["model"]["init_range"] = [0, 1]  # read only by init: uniform / random-vector empties
    with pytest.raises(JobSpecError) as err:
        parse_job(job)
    assert [k for k, _ in err.value.problems] == ["model.init_range"]
    job["model"]["empty_cluster"] = "random-vector"
    assert parse_job(job).model.init_range == [0, 1]


JOB_FILES = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.stem)
def test_every_job_file_in_the_repository_is_valid(path):
    from dkm.data import catalog
    from dkm.jobs import check_against_data

    spec = load_job(path)
    shape = catalog.known_shape(spec.data.dataset, spec.data.options, source=spec.data.source)
    if shape is not None:  # known without the data: checked like --dry-run would
        assert check_against_data(spec, shape, spec.data.store) == []


def test_a_bare_on_key_in_yaml_is_evaluate_on(tmp_path):
    # YAML 1.1 reads `on:` as true; the job still means the splits.
    text = yaml.safe_dump({k: v for k, v in PIXELS.items()}) + (
        "evaluate:\n  metrics: [accuracy]\n  on: [train, test]\n"
    )
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert load_job(path).evaluate_on == ("train", "test")
