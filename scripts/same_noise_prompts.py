"""How much does one word of the prompt move the generation? Prompts that differ in one word,
sampled from the same noise, side by side.

    python scripts/same_noise_prompts.py --run-dir ~/.cache/blip3o-mini/runs/toy \
        "a photo of a red square" "a photo of a red circle" "a photo of a blue square"

Each prompt generates `--num` images with the run's pipeline (its sampling settings) from the
same seed, so image k of every prompt starts from the same noise. Prints the shapes the
GenEval-mini detector finds per prompt, and for each prompt against the first: the mean distance
of their generated CLIP tokens relative to the first's token norm, the mean absolute pixel
difference (0-255), and the relative distance of their conditions Q. A word the DiT hears well
moves all three; one it hears faintly moves Q but hardly the tokens (docs/status.md).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompts", nargs="+", help="two or more prompts; each is compared with the first")
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--num", type=int, default=24, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if len(args.prompts) < 2:
        raise SystemExit("give two or more prompts to compare, e.g. \"a photo of a red square\" \"a photo of a red circle\"")

    import numpy as np
    import torch

    from blip3o_mini.evaluation.detector import detect
    from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
    from blip3o_mini.run import run_config, stage_attention_kernel

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    pipe = Blip3oMiniPipeline.from_run(run, SamplingConfig.from_config(cfg))
    outputs = []
    with stage_attention_kernel(cfg), torch.no_grad():
        for prompt in args.prompts:
            out = pipe([prompt] * args.num, generator=torch.Generator().manual_seed(args.seed))
            outputs.append(out)
            found = Counter(" + ".join(sorted(d.shape for d in detect(np.asarray(im)))) or "nothing" for im in out.images)
            print(f"{prompt!r}: detected {', '.join(f'{k} {n}' for k, n in found.most_common())}")
        q = pipe.generator.condition(pipe.backbone, args.prompts)  # (P, Nq, K)
    first = outputs[0]
    result = {}
    for prompt, out, q_p in zip(args.prompts[1:], outputs[1:], q[1:]):
        tokens = float((out.features - first.features).norm(dim=-1).mean() / first.features.norm(dim=-1).mean())
        pixels = float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                                for a, b in zip(first.images, out.images)]))
        cond = float((q_p - q[0]).norm() / q[0].norm())
        result[prompt] = {"tokens": round(tokens, 3), "pixels": round(pixels, 2), "q": round(cond, 3)}
        print(f"{prompt!r} against {args.prompts[0]!r}: tokens {tokens:.3f}, pixels {pixels:.2f}, Q {cond:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
