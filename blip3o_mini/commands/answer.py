"""`blip3o-mini answer IMAGE "QUESTION" [--run-dir DIR]`: ask the understanding backbone.

Loads the run directory's CLIP and understanding stages (`understanding_stage.load_understanding`)
and prints the greedy answer. Any image file PIL reads works: RGBA is composited on white, other
modes become RGB, other sizes are resized to the model's 64 px with bicubic resampling.
Ask "describe the image." for a caption.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("question", help='e.g. "how many objects are there?" or "describe the image."')
    p.add_argument("--run-dir", default=None,
                   help="run directory with finished clip + understanding stages "
                        "(default: $BLIP3O_MINI_RUN_DIR, else runs/toy)")
    p.add_argument("--max-new-tokens", type=int, default=40)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not args.question.strip():
        raise ValueError('the question is empty; ask something about the image, e.g. "how many objects are there?"')
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image file {args.image} not found")

    from blip3o_mini.artifacts import default_run_dir
    from blip3o_mini.understanding_stage import answer, load_understanding

    backbone = load_understanding(args.run_dir or default_run_dir())
    print(answer(args.image, args.question, backbone=backbone, max_new_tokens=args.max_new_tokens))
    return 0
