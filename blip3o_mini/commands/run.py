"""`blip3o-mini run [--config FILE] [--out DIR]`: the main job, every stage in order."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="toy", help="config name in configs/ or a YAML path")
    p.add_argument("--out", default=None, help="run directory (default: the config's run_dir)")


def main(args: argparse.Namespace) -> int:
    from blip3o_mini.config import load_config
    from blip3o_mini.run import run_pipeline

    cfg = load_config(args.config)
    run_pipeline(cfg, args.out or cfg.get("run_dir", "runs/toy"))
    return 0
