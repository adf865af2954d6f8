"""Time and peak memory of cutting every stride-1 5x5 patch of Fashion-MNIST into Zarr.

70000 images x 576 patches = 40.32M patches x 25 float32 (4.03 GB), written chunk by chunk
by a LocalCluster whose workers have a memory limit far below the output size. Prints wall
time, throughput, the peak resident memory of each worker process and of this (client)
process, the cluster-wide memory peak sampled by distributed's MemorySampler, and the store's
size on disk.

    python benchmarks/bench_patches.py [--images N] [--memory-limit 1GiB] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster
from distributed.diagnostics import MemorySampler

from dkm.data.catalog import ingest
from dkm.data.store import open_dataset
from dkm.features.patches import extract_patches, write_patches


def _peak_rss_mib() -> float:
    # VmHWM is this process's own high-water mark; ru_maxrss would be inherited across the
    # fork+exec that starts worker processes and so report the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="first N images only")
    parser.add_argument("--memory-limit", default="1GiB", help="per worker (2 workers)")
    parser.add_argument("--out", type=Path, default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--size", type=int, default=5)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--pad", type=int, default=0)
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="dkm-bench-patches-"))
    data = ingest("fashion-mnist", work / "fashion-mnist.zarr")
    images = open_dataset(data)["images"]
    if args.images:
        images = images.isel(sample=slice(0, args.images))
    out = work / "patches.zarr"
    shutil.rmtree(out, ignore_errors=True)

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit=args.memory_limit,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        sampler = MemorySampler()
        start = time.perf_counter()
        with sampler.sample("extract", interval=0.25):
            patches = extract_patches(images, args.size, args.stride, args.pad)
            write_patches(patches, out)
        seconds = time.perf_counter() - start
        worker_peaks = client.run(_peak_rss_mib)
        cluster_peak = sampler.to_pandas()["extract"].max() / 2**20

    written = open_dataset(out)["patches"]
    n, d = written.shape
    nbytes = n * d * 4
    print(f"patches: {n} x {d} float32 = {nbytes / 1e9:.2f} GB (chunks {written.chunks[0][0]})")
    print(f"wall time: {seconds:.1f} s  ({n / seconds / 1e6:.2f} M patches/s)")
    print(f"worker memory limit: {args.memory_limit} each, 2 workers x 1 thread")
    for addr, peak in sorted(worker_peaks.items()):
        print(f"peak RSS {addr}: {peak:.0f} MiB")
    print(f"cluster memory peak (MemorySampler, sum of workers): {cluster_peak:.0f} MiB")
    print(f"client peak RSS: {_peak_rss_mib():.0f} MiB")
    print(f"store on disk: {_du(out) / 1e9:.2f} GB at {out}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
