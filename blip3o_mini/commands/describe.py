"""`blip3o-mini describe [CONFIG] [--json] [--memory]`: a config's model built on the meta device
(no download, no memory), its parameters per component, and per-GPU memory estimates."""

from __future__ import annotations

import argparse
import json

from .extract import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="toy", help="config name in configs/ or a YAML path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--memory", action="store_true",
                   help="also estimate memory per GPU for ddp / deepspeed_stage_1 / fsdp (describe.memory_estimate)")
    p.add_argument("--gpus", type=positive_int, nargs="+", default=[1, 8, 32], help="GPU counts for --memory")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="samples per GPU for --memory (default: generation.train.batch_size)")


def main(args: argparse.Namespace) -> int:
    from blip3o_mini.config import load_config
    from blip3o_mini.describe import describe, generation_configs
    from blip3o_mini.sizing import memory_estimate

    cfg = load_config(args.config)
    desc = describe(cfg, str(args.config))
    out = desc.to_dict()
    if args.memory:
        micro = args.micro_batch or generation_configs(cfg)[1].batch_size
        out["memory_gib"] = [
            {"strategy": s, "num_gpus": n, "micro_batch": micro,
             **{k: round(v, 3) for k, v in memory_estimate(desc, s, n, micro).gib().items()}}
            for s in ("ddp", "deepspeed_stage_1", "fsdp") for n in args.gpus]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(desc.table())
    if args.memory:
        print(f"\nestimated memory per GPU (GiB), {out['memory_gib'][0]['micro_batch']} samples per GPU:")
        print(f"{'strategy':<18} {'GPUs':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}")
        for m in out["memory_gib"]:
            print(f"{m['strategy']:<18} {m['num_gpus']:>5} {m['weights']:>8.2f} {m['gradients']:>8.2f} "
                  f"{m['optimizer']:>8.2f} {m['activations']:>8.2f} {m['total']:>8.2f}")
    return 0
