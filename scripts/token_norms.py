"""Do blank generations come from tokens collapsed onto the mean?

The mean squared norm per token, in the generator's whitened units, of real validation images
(by number of objects) and of generated GenEval-mini prompts of a few tags, split by whether the
detector finds an object in the decoded image (README, "Where single objects go missing").

    python scripts/token_norms.py --run-dir ~/.cache/blip3o-mini/runs/toy --seeds 2

A token at the mean has norm 0; a whitened real token has E|z|^2 = whiten_dims over the data.
Generation uses the evaluation stage's pipeline and sampling numbers (`--sde-noise` overrides).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--tags", nargs="+", default=["single_object", "colors", "two_object"])
    p.add_argument("--seeds", type=int, default=2, help="samples per prompt (one batch per seed)")
    p.add_argument("--sde-noise", type=float, default=None, help="sampler noise (default: the run's)")
    args = p.parse_args()

    import datasets
    import torch

    from blip3o_mini.evaluation import detect, make_prompts
    from blip3o_mini.features import load_split_features
    from blip3o_mini.pipeline import Blip3oMiniPipeline

    run = args.run_dir.expanduser()
    pipe = Blip3oMiniPipeline.from_pretrained(run / "evaluation" / "pipeline")
    gen, s = pipe.generator, pipe.sampling
    val = datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"]
    norms = gen.normalize(load_split_features(run / "clip", "val")).pow(2).sum(-1).mean(-1)  # (N,)
    n_obj = torch.tensor([len(o) for o in val["objects"]])  # (N,)
    results = {"real": {int(k): round(norms[n_obj == k].mean().item(), 2) for k in n_obj.unique()}}
    for k, v in results["real"].items():
        print(f"real val images with {k} object(s): {v:.1f} per token")
    for tag in args.tags:
        prompts = [m["prompt"] for m in make_prompts() if m["tag"] == tag]
        norm, blank = [], []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            z = gen.generate_features(pipe.backbone, prompts, s.num_inference_steps, s.guidance_scale, g,
                                      return_trajectory=True, sde_noise=args.sde_noise)[1].x_1  # (P, 64, L)
            feats = gen.denormalize(z)  # (P, 64, F)
            images = pipe.decoder.decode(feats, s.decoder_steps, s.decoder_guidance_scale, generator=g,
                                         output_type="pil")
            norm.append(z.pow(2).sum(-1).mean(-1))
            blank += [not detect(im) for im in images]
        norm, blank = torch.cat(norm), torch.tensor(blank)
        row = {"images": len(blank), "blank": round(blank.float().mean().item(), 3),
               "norm": round(norm.mean().item(), 2),
               "norm_blank": round(norm[blank].mean().item(), 2) if blank.any() else None,
               "norm_drawn": round(norm[~blank].mean().item(), 2) if (~blank).any() else None}
        results[tag] = row
        print(f"{tag}: {row['images']} images, {row['blank']:.2f} blank; per token {row['norm']:.1f} "
              f"(blank {row['norm_blank']}, with an object {row['norm_drawn']})", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
