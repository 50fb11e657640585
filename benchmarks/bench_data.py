"""Time ShapesWorld data generation, WebDataset shard export and shard reading.

    python benchmarks/bench_data.py                      # 10k train + 1k val, 1000 per shard
    python benchmarks/bench_data.py --num-train 2000 --num-val 200

Prints seconds and samples/s for each step. The target (issue 2): generating 10,000 samples
takes under 60 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-val", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import datasets

    from blip3o_mini.data import generate
    from blip3o_mini.data.webdataset import ShardReader, export_shards

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        n = args.num_train + args.num_val
        ds, t_gen = timed(lambda: generate(out / "shapesworld", args.num_train, args.num_val, args.seed))
        paths, t_export = timed(lambda: [path for split, d in ds.items() for path in export_shards(
            d, out / "shards", prefix=split, samples_per_shard=args.samples_per_shard)])
        reader = ShardReader([str(path) for path in paths])
        num_read, t_read = timed(lambda: sum(1 for _ in reader))
        megabytes = sum(path.stat().st_size for path in paths) / 1e6

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
              f"load average {load:.1f} at the end")
        print(f"{'step':<34} {'samples':>8} {'seconds':>8} {'samples/s':>10}")
        rows = [(f"generate (train {args.num_train} + val {args.num_val})", n, t_gen),
                (f"export {len(paths)} shard(s), {megabytes:.1f} MB", n, t_export),
                ("read shards back (decode JPEG)", num_read, t_read)]
        for name, count, seconds in rows:
            print(f"{name:<34} {count:>8} {seconds:>8.1f} {count / max(seconds, 1e-9):>10.0f}")
        assert num_read == n and reader.stats.num_skipped == 0, reader.stats.summary()


if __name__ == "__main__":
    main()
