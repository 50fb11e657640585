"""`blip3o-mini generate "PROMPT" -o out.png`: text -> image with a trained pipeline."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='e.g. "a photo of a red circle left of a blue square"')
    p.add_argument("-o", "--output", default="out.png", help="PNG file to write")
    p.add_argument("--run-dir", default=None,
                   help="a finished run: its evaluation/pipeline, else its stage artifacts "
                        "(default: $BLIP3O_MINI_RUN_DIR, else runs/toy), as `blip3o-mini answer`")
    p.add_argument("--pipeline", default=None, help="a directory written by save_pretrained")
    p.add_argument("--steps", type=int, default=None,
                   help="DiT Euler steps (default: the run's generation.flow.num_steps; toy 30)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="DiT CFG scale (default: the run's generation.flow.guidance_scale; toy 5.0)")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from blip3o_mini.artifacts import default_run_dir
    from blip3o_mini.pipeline import Blip3oMiniPipeline

    if not args.prompt.strip():
        raise ValueError('the prompt is empty; describe an image, e.g. "a photo of a red circle"')
    if not args.output.lower().endswith(".png"):
        raise ValueError(f"--output must be a .png file, got {args.output!r}")
    run_dir = Path(args.run_dir or default_run_dir())
    saved = Path(args.pipeline or run_dir / "evaluation" / "pipeline")
    pipe = (Blip3oMiniPipeline.from_pretrained(saved) if (saved / "pipeline.json").exists()
            else Blip3oMiniPipeline.from_run(run_dir))
    out = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               generator=torch.Generator().manual_seed(args.seed))
    out.images[0].save(args.output)
    print(f"wrote {args.output}")
    return 0
