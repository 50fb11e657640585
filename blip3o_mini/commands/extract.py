"""`blip3o-mini extract --shards GLOB --out DIR (--config NAME | --encoder DIR)`: write CLIP
targets for WebDataset shards once, one .safetensors file per shard (blip3o_mini/extract.py).
Run one process per GPU (torchrun / srun): each takes its own shards."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, nargs="+", help="tar files, globs or directories")
    p.add_argument("--out", required=True, help="output directory (one .safetensors per shard)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="build the encoder of this config's clip: section (pretrained weights)")
    src.add_argument("--encoder", help="a ClipEncoder.save directory, e.g. RUN_DIR/clip/encoder")
    p.add_argument("--rank", type=int, default=None, help="default: $RANK or $SLURM_PROCID, else 0")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="default: $WORLD_SIZE or $SLURM_NTASKS, else 1")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored feature dtype (bfloat16 halves the disk: 229 KB per 64x1792 image)")
    p.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when a GPU is visible, else cpu")
    p.add_argument("--check", action="store_true", help="afterwards, check that every shard has its output")


def main(args: argparse.Namespace) -> int:
    import os

    import torch

    from blip3o_mini.extract import check_extraction, rank_and_world, run_extraction
    from blip3o_mini.vision import ClipConfig, ClipEncoder

    rank, world = rank_and_world(args.rank, args.world_size)
    if args.encoder:
        encoder = ClipEncoder.load(args.encoder)
    else:
        from blip3o_mini.config import build, load_config
        from blip3o_mini.describe import split_section

        encoder = ClipEncoder(build(ClipConfig, split_section(load_config(args.config).get("clip"))[0]))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    encoder = encoder.to(device)
    results = run_extraction(encoder, args.shards, args.out, rank, world, args.batch_size, args.dtype)
    done = sum(r.num_samples for r in results)
    print(f"rank {rank}/{world}: {len(results)} shard(s), {done} sample(s), "
          f"{sum(r.num_skipped for r in results)} skipped, {sum(r.reused for r in results)} already done")
    if args.check:
        counts = check_extraction(args.shards, args.out)
        print(f"complete: {len(counts)} shard(s), {sum(counts.values())} sample(s) in {args.out}")
    return 0
