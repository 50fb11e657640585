"""Is the relation drawn? GenEval-mini's position prompts generated from many noise seeds.

    python scripts/relation_seeds.py --run-dir ~/.cache/blip3o-mini/runs/toy --seeds 0 1 2 3 4 5

One evaluation holds 54 position images, too few to tell a generator that draws the asked
relation a little more often than its opposite from one that ignores the relation word. This
script generates the evaluation's position prompts again with the run's pipeline and sampling
numbers, the noise drawn from each seed as the evaluation stage draws it (seed 0 gives the
evaluation's own images), and scores them with the GenEval-mini detector. In the images that
hold both named colours it asks GenEval's rule where the largest object of the first colour
stands against the largest of the second, whatever their shapes (`evaluation.relation_verdict`):
in the asked relation, in its opposite, or in neither (a perpendicular or no relation).

Pooled over the seeds, a two-sided sign test: among the images that draw the asked relation or
its opposite, is the asked one drawn more often than half? Also per axis (left / right, above /
below) and per relation word: GenEval-mini's prompts are not balanced between the words (18
"right of", 11 "left of"), so a generator that puts the first-named object on one side,
whatever the word, would lean to the asked relation for one word and to its opposite for the
other. And GenEval's own position accuracy per seed (shapes and counts must hold too). Only the
evaluation's batches that hold position prompts are generated (the toy config: one batch of 54),
about a minute a seed in fp32 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from math import comb
from pathlib import Path


def sign_test(k: int, n: int) -> float:
    """Two-sided binomial p-value of k successes in n trials at p = 1/2."""
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished run (blip3o-mini run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="the evaluation's noise seeds")
    args = p.parse_args()

    import torch

    from blip3o_mini.data.text import INVERSE
    from blip3o_mini.evaluation import relation_verdict, score_images
    from blip3o_mini.evaluation.folder import batch_seed
    from blip3o_mini.evaluation_stage import evaluation_prompts, run_evaluation_setup
    from blip3o_mini.run import stage_attention_kernel

    cfg, _, pipe, ecfg = run_evaluation_setup(args.run_dir.expanduser())
    prompts, size = evaluation_prompts(ecfg), ecfg.prompts_per_batch
    starts = [s for s in range(0, len(prompts), size) if any(m["tag"] == "position" for m in prompts[s:s + size])]
    if not starts:
        raise SystemExit(f"{args.run_dir}: the evaluation has no position prompts")
    pooled = Counter()
    for seed in args.seeds:
        start_time, images, metas = time.perf_counter(), [], []
        with stage_attention_kernel(cfg):
            for s in starts:  # whole batches, so that each prompt gets the evaluation's noise
                batch = [m for m in prompts[s:s + size] for _ in range(ecfg.samples_per_prompt)]
                out = pipe([m["prompt"] for m in batch], generator=torch.Generator().manual_seed(batch_seed(seed, s)))
                keep = [i for i, m in enumerate(batch) if m["tag"] == "position"]
                images += [out.images[i] for i in keep]
                metas += [batch[i] for i in keep]
        result = score_images(images, metas)
        counts = Counter()
        for r, m in zip(result.records, metas):
            rel = m["include"][1]["position"][0]
            axis = "left/right" if rel in ("left of", "right of") else "above/below"
            verdict = relation_verdict(r["detections"], m) or "colour missing"
            counts[verdict] += 1
            counts[(axis, verdict)] += 1
            counts[(rel, verdict)] += 1
        pooled += counts
        print(f"seed {seed}: position {result.per_tag['position']:.3f} ({len(metas)} images); both colours "
              f"{len(metas) - counts['colour missing']}: asked {counts['asked']}, opposite {counts['opposite']}, "
              f"neither {counts['neither']}  ({time.perf_counter() - start_time:.0f} s)", flush=True)
    groups = ["left/right", "above/below", *INVERSE]  # the axes, then each relation word
    for label, key in [("all", lambda v: v)] + [(g, lambda v, g=g: (g, v)) for g in groups]:
        a, o, n = pooled[key("asked")], pooled[key("opposite")], pooled[key("neither")]
        print(f"pooled over {len(args.seeds)} seeds, {label}: asked {a}, opposite {o}, neither {n}; asked among "
              f"asked + opposite {a / max(1, a + o):.3f} (sign test p = {sign_test(a, a + o):.3g})")


if __name__ == "__main__":
    main()
