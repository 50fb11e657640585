"""`blip3o-mini run [--config FILE] [--out DIR] [--devices N --num-nodes M --strategy S
--precision P]`: the main job, every stage in order; the trainer flags override the config's
`trainer:` section (training/distributed.py)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="toy", help="config name in configs/ or a YAML path")
    p.add_argument("--out", default=None, help="run directory (default: the config's run_dir)")
    from blip3o_mini.training.distributed import add_trainer_arguments

    add_trainer_arguments(p)


def main(args: argparse.Namespace) -> int:
    from blip3o_mini.config import load_config
    from blip3o_mini.run import run_pipeline
    from blip3o_mini.training.distributed import apply_trainer_arguments

    cfg = apply_trainer_arguments(load_config(args.config), args)
    run_pipeline(cfg, args.out or cfg.get("run_dir", "runs/toy"))
    return 0
