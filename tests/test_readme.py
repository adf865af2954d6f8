"""The README is self-contained and its Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dkm import evaluate

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_links_nothing_outside_the_repository():
    text = README.read_text()
    assert "../" not in text


def test_readme_defines_every_metric():
    text = README.read_text()
    for name in evaluate.METRICS:
        assert re.search(rf"^\| `{name}` \| ", text, flags=re.M), name


def test_readme_documents_every_tuning_key():
    import dask

    import dkm  # noqa: F401 - registers the defaults

    def leaves(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}.{key}")
            else:
                yield f"{prefix}.{key}"

    text = README.read_text()
    for key in leaves(dask.config.get("dkm"), "dkm"):
        assert f"| `{key}` |" in text, key


@pytest.mark.slow
def test_readme_patch_example_runs(tmp_path, monkeypatch):
    from dkm.data.catalog import ingest

    monkeypatch.chdir(tmp_path)
    ingest("mnist-5k", "data/mnist-5k.zarr")
    (block,) = [b for b in python_blocks() if "stitch_patches" in b]
    exec(compile(block, "README.md", "exec"), {})
