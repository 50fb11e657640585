"""Do blank generations come from tokens collapsed onto the mean?

The mean squared norm per token, in the generator's whitened units, of real validation images
(by number of objects) and of generated GenEval-mini prompts of a few tags, split by whether the
detector finds an object in the decoded image (docs/status.md, "Where single objects go missing").

    python scripts/token_norms.py --run-dir ~/.cache/blip3o-mini/runs/toy --seeds 2

A token at the mean has norm 0; a whitened real token has E|z|^2 = whiten_dims over the data.
Generation uses the evaluation stage's pipeline and sampling numbers (`--sde-noise` overrides).

What the tokens hold: a linear probe (softmax regression on the whitened coordinates, fit on 800
real validation images, accuracy printed on the other 200) labels each of the 64 tokens with the
colour of the object under its 8x8-pixel patch, or background. On a generated image it counts the
tokens it reads as object, and how sure it is of their colour (the largest colour probability
among the colours): an object the DiT placed but left between colours shows as object tokens of
low colour confidence; an object it never placed, as no object tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


PATCH, MIN_INK = 8, 8  # a token's patch is 8x8 pixels; 8 of its 64 pixels in one colour make it an object


def patch_labels(images) -> "torch.Tensor":
    """(N,) images -> (N, 64) int: per 8x8 patch, the palette index + 1 of its most common object
    colour when at least MIN_INK pixels have it, else 0 (background). Row-major, as the tokens."""
    import numpy as np
    import torch

    from blip3o_mini.data.world import COLORS
    from blip3o_mini.evaluation.detector import DetectorConfig, classify_pixels, to_array

    cfg, out = DetectorConfig(), []
    for im in images:
        cls = classify_pixels(to_array(im), cfg)  # (64, 64)
        g = cls.shape[0] // PATCH
        patches = cls.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, -1)  # (64, 64 px)
        counts = np.stack([(patches == c).sum(1) for c in range(1, len(COLORS) + 1)], 1)  # (64, P)
        out.append(np.where(counts.max(1) >= MIN_INK, counts.argmax(1) + 1, 0))
    return torch.as_tensor(np.stack(out))


def fit_probe(z, labels, num_classes: int, steps: int = 300):
    """Softmax regression (L -> num_classes) on tokens z (M, L) with labels (M,), by L-BFGS."""
    import torch

    probe = torch.nn.Linear(z.shape[-1], num_classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z), labels) + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe.requires_grad_(False)


def read_tokens(probe, z) -> tuple["torch.Tensor", "torch.Tensor"]:
    """z (B, 64, L) -> object tokens per image (B,), mean colour confidence of those tokens (B,)
    (NaN where there are none)."""
    import torch

    p = probe(z).softmax(-1)  # (B, 64, 1 + P)
    obj = p.argmax(-1) > 0  # (B, 64)
    conf = p[..., 1:].max(-1).values / p[..., 1:].sum(-1)  # (B, 64) colour confidence among colours
    mean_conf = torch.where(obj, conf, 0).sum(1) / obj.sum(1)  # (B,) NaN for no object token
    return obj.sum(1), mean_conf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished toy run (blip3o-mini run)")
    p.add_argument("--tags", nargs="+", default=["single_object", "colors", "two_object"])
    p.add_argument("--seeds", type=int, default=2, help="samples per prompt (one batch per seed)")
    p.add_argument("--sde-noise", type=float, default=None, help="sampler noise (default: the run's)")
    args = p.parse_args()

    import datasets
    import torch

    from blip3o_mini.data.world import COLORS
    from blip3o_mini.evaluation import detect, make_prompts
    from blip3o_mini.features import load_split_features
    from blip3o_mini.pipeline import Blip3oMiniPipeline

    run = args.run_dir.expanduser()
    pipe = Blip3oMiniPipeline.from_pretrained(run / "evaluation" / "pipeline")
    gen, s = pipe.generator, pipe.sampling
    val = datasets.load_from_disk(str(run / "data" / "shapesworld"))["val"]
    z_val = gen.normalize(load_split_features(run / "clip", "val"))  # (N, 64, L)
    norms = z_val.pow(2).sum(-1).mean(-1)  # (N,)
    n_obj = torch.tensor([len(o) for o in val["objects"]])  # (N,)
    results = {"real": {int(k): round(norms[n_obj == k].mean().item(), 2) for k in n_obj.unique()}}
    for k, v in results["real"].items():
        print(f"real val images with {k} object(s): {v:.1f} per token")

    labels = patch_labels(val["image"])  # (N, 64)
    n_fit = int(0.8 * len(val))
    probe = fit_probe(z_val[:n_fit].flatten(0, 1), labels[:n_fit].flatten(), 1 + len(COLORS))
    held = probe(z_val[n_fit:]).argmax(-1)  # (N - n_fit, 64)
    acc = (held == labels[n_fit:]).float().mean().item()
    obj_acc = ((held > 0) == (labels[n_fit:] > 0)).float().mean().item()
    n_tok, conf = read_tokens(probe, z_val[n_fit:])
    real_tok = {int(k): round(n_tok[n_obj[n_fit:] == k].float().mean().item(), 1) for k in n_obj.unique()}
    results["probe"] = {"accuracy": round(acc, 3), "object_vs_background": round(obj_acc, 3),
                        "real_object_tokens": real_tok, "real_colour_confidence": round(conf.nanmean().item(), 3)}
    print(f"token probe on {len(val) - n_fit} held-out real images: accuracy {acc:.3f} "
          f"(object vs background {obj_acc:.3f}); object tokens per image by objects {real_tok}, "
          f"colour confidence {conf.nanmean().item():.2f}")
    for tag in args.tags:
        prompts = [m["prompt"] for m in make_prompts() if m["tag"] == tag]
        norm, blank, tokens, confidence = [], [], [], []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            z = gen.generate_features(pipe.backbone, prompts, s.num_inference_steps, s.guidance_scale, g,
                                      return_trajectory=True, sde_noise=args.sde_noise)[1].x_1  # (P, 64, L)
            feats = gen.denormalize(z)  # (P, 64, F)
            images = pipe.decoder.decode(feats, s.decoder_steps, s.decoder_guidance_scale, generator=g,
                                         output_type="pil")
            norm.append(z.pow(2).sum(-1).mean(-1))
            n_tok, conf = read_tokens(probe, z)
            tokens.append(n_tok.float())
            confidence.append(conf)
            blank += [not detect(im) for im in images]
        norm, blank = torch.cat(norm), torch.tensor(blank)
        tokens, confidence = torch.cat(tokens), torch.cat(confidence)

        def split(x):  # mean over blank and over drawn images (NaN: no object token to read)
            return [round(x[m].nanmean().item(), 2) if m.any() else None for m in (blank, ~blank)]

        row = {"images": len(blank), "blank": round(blank.float().mean().item(), 3),
               "norm": round(norm.mean().item(), 2)}
        row["norm_blank"], row["norm_drawn"] = split(norm)
        row["object_tokens_blank"], row["object_tokens_drawn"] = split(tokens)
        row["colour_confidence_blank"], row["colour_confidence_drawn"] = split(confidence)
        row["no_object_token_blank"] = round((tokens[blank] == 0).float().mean().item(), 2) if blank.any() else None
        results[tag] = row
        print(f"{tag}: {row['images']} images, {row['blank']:.2f} blank; per token {row['norm']:.1f} "
              f"(blank {row['norm_blank']}, with an object {row['norm_drawn']}); object tokens "
              f"{row['object_tokens_blank']} / {row['object_tokens_drawn']}, colour confidence "
              f"{row['colour_confidence_blank']} / {row['colour_confidence_drawn']} (blank / drawn); "
              f"blank images with no object token: {row['no_object_token_blank']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
