"""At which noise level does the toy DiT lose the scene? SDEdit on real CLIP tokens.

Each of 200 validation images' CLIP tokens is noised to time `t0` on the flow's straight path
(x_t0 = t0 x_1 + (1 - t0) x_0; t0 = 1 is the clean token, 0 pure noise), then the run's DiT
finishes the path from t0 to 1 conditioned on the image's caption (Euler steps at the sampler's
step size, the run's CFG), the run's decoder paints the tokens, and the GenEval-mini detector
scores the result against the prompt built from the image's scene graph, as the reconstruction
check does. t0 = 1 is that reconstruction (with the run's `whiten_dims`: its ceiling); t0 = 0 is
plain generation from the caption, scored against the full scene (every object, count and
relation), a harder test than GenEval-mini's prompts. Where the score falls between the two says
which part of the path the DiT gets wrong.

    python scripts/sdedit_geneval.py --run-dir ~/.cache/blip3o-mini/runs/toy --starts 1 0.7 0.5 0.3 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--starts", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3, 0.0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args()

    import datasets

    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.decoder_stage import decoder_configs, reconstruction_report
    from blip3o_mini.features import load_split_features
    from blip3o_mini.flow import interpolate
    from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
    from blip3o_mini.run import run_config, stage_attention_kernel

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    ecfg = decoder_configs(cfg.get("decoder"))[2]
    pipe = Blip3oMiniPipeline.from_run(run, SamplingConfig.from_config(cfg))
    gen, B = pipe.generator, args.batch_size
    val = datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"]
    val = val.select(range(min(args.num_images, len(val))))
    originals, scenes = images_uint8(val), [scene_of(r) for r in val]
    captions = [c[0] for c in val["captions"]]
    with torch.no_grad(), stage_attention_kernel(cfg):
        cond = gen.condition(pipe.backbone, captions, chunk_size=B)  # (M, Nq, K)
        x_1 = gen.normalize(load_split_features(run / "clip", "val")[:len(val)])  # (M, 64, L)
        noise = torch.randn(x_1.shape, generator=torch.Generator().manual_seed(0))  # (M, 64, L)
        results = {}
        for t0 in args.starts:
            x = interpolate(noise, x_1, torch.full((len(x_1),), t0))  # (M, 64, L) on the straight path at t0
            if t0 < 1:  # finished at the sampler's step size over what is left of the path
                x = torch.cat([gen.flow.sample(gen.dit, cond[i:i + B], x.shape[1:], x_0=x[i:i + B], start=t0).x_1
                               for i in range(0, len(val), B)])
            report = reconstruction_report(pipe.decoder, gen.denormalize(x), originals, scenes, ecfg)
            results[t0] = round(report.geneval.summary()["overall"], 4)
            print(f"from t0 = {t0:.2f}: GenEval-mini of the scene prompt {results[t0]:.3f}, "
                  f"PSNR {report.psnr:.1f} dB", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
