"""One writer per store: a second writer is told who holds the store; a dead holder's lock
is never in the way; two ``dkm run`` on one results store -> exactly one runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dkm.data.locks import StoreLocked, lock_path, store_lock

DKM = Path(sys.executable).with_name("dkm")

HOLD = """
import sys, time
from dkm.data.locks import store_lock
with store_lock(sys.argv[1], purpose="a test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_told_who_holds_the_store(tmp_path):
    store = tmp_path / "r.zarr"
    holder = hold(store, 30)
    try:
        with pytest.raises(StoreLocked) as info, store_lock(store, purpose="me"):
            pytest.fail("took a held lock")
        message = str(info.value)
        assert message.startswith(f"{store}: in use by a test holder (pid {holder.pid} on ")
        assert "since 20" in message
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is gone with it.
    with store_lock(store, purpose="me"):
        assert lock_path(store).is_file()


def test_waiting_for_the_holder(tmp_path):
    store = tmp_path / "d.zarr"
    holder = hold(store, 1.5)
    start = time.monotonic()
    with store_lock(store, purpose="me", wait=30, poll=0.1):
        assert time.monotonic() - start > 0.5
    holder.wait(timeout=30)


def test_the_lock_is_released_after_an_exception(tmp_path):
    store = tmp_path / "x.zarr"
    with pytest.raises(RuntimeError), store_lock(store, purpose="me"):
        raise RuntimeError("boom")
    with store_lock(store, purpose="me again"):
        pass


@pytest.mark.slow
def test_two_runs_on_one_store_exactly_one_runs(tmp_path):
    job = {
        "name": "race",
        "data": {"dataset": "digits", "store": str(tmp_path / "digits.zarr")},
        "model": {"k": [4, 8], "max_iter": 20},
        "output": {"store": str(tmp_path / "race.zarr")},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "DKM_SCHEDULER": ""}
    procs = [
        subprocess.Popen(
            [DKM, "run", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    (loser,) = [err for code, err in results if code == 1]
    assert "output.store:" in loser and "race.zarr: in use by dkm run of job 'race' (pid" in loser
    assert "Traceback" not in loser
