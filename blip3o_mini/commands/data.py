"""`blip3o-mini data --out DIR --num-train N --num-val M --seed S [--relation-rule R] [--shards DIR]`."""

from __future__ import annotations

import argparse

from blip3o_mini.data.world import DEFAULT_RELATION_RULE, RELATION_RULES


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:  # `datasets` cannot read back a split saved empty
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def shard_size(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 sample per shard, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (datasets.load_from_disk-able)")
    p.add_argument("--num-train", type=positive_int, default=10000)
    p.add_argument("--num-val", type=positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relation-rule", choices=RELATION_RULES, default=DEFAULT_RELATION_RULE,
                   help="which relation the text states for a pair apart on both axes (data.relation_rule)")
    p.add_argument("--shards", default=None,
                   help="also export WebDataset .tar shards (jpg + txt + json) to this directory")
    p.add_argument("--samples-per-shard", type=shard_size, default=1000)


def main(args: argparse.Namespace) -> int:
    from blip3o_mini.data import generate, summarize

    ds = generate(args.out, args.num_train, args.num_val, args.seed, args.relation_rule)
    print(f"ShapesWorld written to {args.out} (seed {args.seed})")
    print(summarize(ds))
    if args.shards:
        from blip3o_mini.data.webdataset import export_shards

        for split, d in ds.items():
            paths = export_shards(d, args.shards, prefix=split, samples_per_shard=args.samples_per_shard)
            print(f"{split}: {len(paths)} WebDataset shard(s) in {args.shards}")
    return 0
