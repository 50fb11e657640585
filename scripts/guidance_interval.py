"""GenEval-mini of a finished run's pipeline with classifier-free guidance applied only at
times t in [lo, hi] (0 = noise; `generation.flow.guidance_interval`, Kynkaanniemi et al. 2024),
over several evaluation seeds: does guiding the high-noise steps pay? (docs/status.md).

    python scripts/guidance_interval.py --run-dir ~/.cache/blip3o-mini/runs/toy --intervals 0:1 0.2:1 --seeds 0 1 2

Each (interval, seed) generates the evaluation stage's 324 GenEval-mini prompts with its
sampling numbers (the run's DiT CFG scale, steps, decoder), the noise drawn from `--seeds`
instead of the evaluation's seed 0 (so the arms of one seed share their noise), and scores them
with the GenEval-mini detector: the overall score and tags, the share of single-object images
left blank and of two-object images short of an object. About 3.5 minutes per row on a 2-core
CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished run (blip3o-mini run)")
    p.add_argument("--intervals", nargs="+", default=["0:1", "0.2:1"], help="LO:HI times to guide at")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="the evaluation's noise seeds")
    args = p.parse_args()

    from blip3o_mini.config import build
    from blip3o_mini.evaluation import score_folder
    from blip3o_mini.evaluation_stage import EvaluationConfig, write_evaluation_images
    from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
    from blip3o_mini.run import run_config, stage_attention_kernel

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    base = SamplingConfig.from_config(cfg)
    pipe = Blip3oMiniPipeline.from_run(run, base)
    ecfg = build(EvaluationConfig, cfg.get("evaluation", {}))
    for seed in args.seeds:
        for interval in args.intervals:
            lo, hi = (float(x) for x in interval.split(":"))
            pipe.sampling = dataclasses.replace(base, guidance_interval=(lo, hi))
            start = time.perf_counter()
            with stage_attention_kernel(cfg), tempfile.TemporaryDirectory() as tmp:
                result = score_folder(write_evaluation_images(pipe, dataclasses.replace(ecfg, seed=seed), Path(tmp)),
                                      write=False)
            s, counts = result.summary(), result.object_counts()
            tags = "  ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "overall" and v is not None)
            print(f"seed {seed}  guidance at t in [{lo:g}, {hi:g}]: GenEval-mini {s['overall']:.3f}  {tags}  "
                  f"| single blank {counts['single_object']['blank']:.2f}, two short {counts['two_object']['fewer']:.2f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
