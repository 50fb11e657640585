"""How many principal directions of a CLIP token does the pixel decoder need? Reconstruction
GenEval-mini of validation images decoded from their real CLIP tokens kept on only their k
largest principal directions (the rest at the mean): the ceiling of a generator that produces k
whitened coordinates per token (`generation.whiten_dims`; docs/status.md). Also prints, per
shape, the fraction of the scenes' objects found in the decodes with their colour and shape.

    python scripts/reconstruct_top_directions.py --run-dir ~/.cache/blip3o-mini/runs/toy --dims 8 12 16 24 32 128

The directions are those of the run's standardised training tokens (features.measure_whitening);
decoding uses the decoder stage's evaluation settings (images, steps, CFG, seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--dims", type=int, nargs="+", default=[8, 16, 24, 32, 128])
    args = p.parse_args()

    import datasets

    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.data.tensors import images_uint8
    from blip3o_mini.data.world import SHAPES
    from blip3o_mini.decoder_stage import decoder_configs, reconstruction_report
    from blip3o_mini.features import load_split_features, measure_whitening
    from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
    from blip3o_mini.run import run_config

    run = args.run_dir.expanduser()
    cfg = run_config(run)
    ecfg = decoder_configs(cfg.get("decoder"))[2]
    pipe = Blip3oMiniPipeline.from_run(run, SamplingConfig.from_config(cfg))
    decoder, mean, std = pipe.decoder, pipe.generator.feature_mean, pipe.generator.feature_std  # (F,) each
    var, basis = measure_whitening(load_split_features(run / "clip", "train"), mean, std)  # (F,), (F, F)
    val = datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"]
    val = val.select(range(min(ecfg.num_images, len(val))))
    feats = load_split_features(run / "clip", "val")[: len(val)]  # (M, 64, F)
    originals, scenes = images_uint8(val), [scene_of(r) for r in val]
    results = {}
    for k in args.dims:
        top = basis[:, :k]  # (F, k)
        kept = ((feats - mean) / std) @ top @ top.T * std + mean  # (M, 64, F) on the k largest directions
        report = reconstruction_report(decoder, kept, originals, scenes, ecfg)
        results[k] = round(report.geneval.summary()["overall"], 4)
        found = ", ".join(f"{s} {report.recall[s]:.2f}" for s in SHAPES if s in report.recall)
        print(f"top {k:>3} of {len(var)} directions ({var[:k].sum() / var.sum():.3f} of the variance): "
              f"reconstruction GenEval-mini {results[k]:.3f}, PSNR {report.psnr:.1f} dB; "
              f"objects found in their colour and shape: {found}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
